/**
 * The model's Markdown -> HTML: markdown-it with raw HTML off (any tag the model writes is
 * shown as text), links only to web pages and mail (a `command:`, `vscode:`, `file:` or
 * `javascript:` link stays plain text), images only from `data:` URIs (a remote image is shown
 * as its alt text and never fetched), code highlighted by highlight.js (common languages only,
 * to keep the page small). The result still goes through sanitize.ts.
 */

import hljs from 'highlight.js/lib/core';
import bash from 'highlight.js/lib/languages/bash';
import c from 'highlight.js/lib/languages/c';
import cpp from 'highlight.js/lib/languages/cpp';
import csharp from 'highlight.js/lib/languages/csharp';
import css from 'highlight.js/lib/languages/css';
import diff from 'highlight.js/lib/languages/diff';
import dockerfile from 'highlight.js/lib/languages/dockerfile';
import go from 'highlight.js/lib/languages/go';
import ini from 'highlight.js/lib/languages/ini';
import java from 'highlight.js/lib/languages/java';
import javascript from 'highlight.js/lib/languages/javascript';
import json from 'highlight.js/lib/languages/json';
import kotlin from 'highlight.js/lib/languages/kotlin';
import lua from 'highlight.js/lib/languages/lua';
import makefile from 'highlight.js/lib/languages/makefile';
import markdown from 'highlight.js/lib/languages/markdown';
import php from 'highlight.js/lib/languages/php';
import python from 'highlight.js/lib/languages/python';
import ruby from 'highlight.js/lib/languages/ruby';
import rust from 'highlight.js/lib/languages/rust';
import shell from 'highlight.js/lib/languages/shell';
import sql from 'highlight.js/lib/languages/sql';
import swift from 'highlight.js/lib/languages/swift';
import typescript from 'highlight.js/lib/languages/typescript';
import xml from 'highlight.js/lib/languages/xml';
import yaml from 'highlight.js/lib/languages/yaml';
import MarkdownIt from 'markdown-it';

import { SAFE_HREF, SAFE_IMAGE_SRC, sanitize } from './sanitize';

const LANGUAGES = { bash, c, cpp, csharp, css, diff, dockerfile, go, ini, java, javascript, json,
  kotlin, lua, makefile, markdown, php, python, ruby, rust, shell, sql, swift, typescript, xml,
  yaml };
for (const [name, language] of Object.entries(LANGUAGES)) {
  hljs.registerLanguage(name, language);
}

function highlight(code: string, lang: string): string {
  const language = lang.trim().toLowerCase();
  if (language === '' || hljs.getLanguage(language) === undefined) {
    return ''; // markdown-it escapes it
  }
  return hljs.highlight(code, { language, ignoreIllegals: true }).value;
}

const md = new MarkdownIt({ html: false, linkify: false, typographer: false, highlight });

// Links and images share markdown-it's check; the image rule below narrows images further.
md.validateLink = (url: string): boolean => SAFE_HREF.test(url) || SAFE_IMAGE_SRC.test(url);

md.renderer.rules.image = (tokens, index, options, env, self) => {
  const token = tokens[index];
  const src = String(token?.attrGet('src') ?? '');
  const alt = self.renderInlineAsText(token?.children ?? [], options, env);
  if (SAFE_IMAGE_SRC.test(src)) {
    return `<img src="${md.utils.escapeHtml(src)}" alt="${md.utils.escapeHtml(alt)}">`;
  }
  return `<span class="blocked-image" title="Remote images are not loaded">[image: ${
    md.utils.escapeHtml(alt)}]</span>`;
};

/** Renders Markdown into a clean fragment of `doc`. */
export function renderMarkdown(text: string, doc: Document): DocumentFragment {
  return sanitize(md.render(text), doc);
}
