/**
 * The second line of defence for the model's Markdown (the first is markdown-it with raw HTML
 * off and our link and image rules, markdown.ts; the third is the page's CSP): the rendered
 * HTML is parsed into an inert <template> and rebuilt from an allow-list. Elements not on it
 * are unwrapped (their text stays); script-like ones are dropped with their content; every
 * attribute not on the list goes, `on*` handlers included; links keep only http(s) and mailto
 * targets, images only `data:` images.
 */

const ATTRIBUTES: Record<string, readonly string[]> = {
  a: ['href', 'title'],
  img: ['src', 'alt', 'title'],
  code: ['class'],
  span: ['class', 'title'],
  pre: [],
  p: [],
  br: [],
  hr: [],
  h1: [],
  h2: [],
  h3: [],
  h4: [],
  h5: [],
  h6: [],
  strong: [],
  em: [],
  s: [],
  del: [],
  blockquote: [],
  ul: [],
  ol: ['start'],
  li: [],
  table: [],
  thead: [],
  tbody: [],
  tr: [],
  th: [],
  td: [],
};

/** Dropped whole, content included. */
const DROPPED = new Set(['script', 'style', 'iframe', 'object', 'embed', 'link', 'meta', 'base',
  'form', 'svg', 'math', 'template', 'noscript', 'frame', 'frameset', 'audio', 'video',
  'source', 'track', 'canvas', 'textarea', 'select', 'button', 'input']);

export const SAFE_HREF = /^(https?:\/\/|mailto:)/i;
export const SAFE_IMAGE_SRC = /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+$/;
const SAFE_CLASS = /^(hljs|hljs-[\w-]+|language-[\w+#.-]+|blocked-image|[\w-]+_)$/;

function allowedValue(tag: string, name: string, value: string): boolean {
  if (name === 'href') {
    return SAFE_HREF.test(value.trim());
  }
  if (name === 'src') {
    return SAFE_IMAGE_SRC.test(value.trim());
  }
  if (name === 'class') {
    return value.split(/\s+/).filter((c) => c !== '').every((c) => SAFE_CLASS.test(c));
  }
  if (name === 'start') {
    return tag === 'ol' && /^\d{1,9}$/.test(value);
  }
  return true;
}

function clean(parent: Node): void {
  for (const node of [...parent.childNodes]) {
    if (node.nodeType === Node.TEXT_NODE) {
      continue;
    }
    if (node.nodeType !== Node.ELEMENT_NODE) {
      node.remove(); // comments, processing instructions
      continue;
    }
    const element = node as Element;
    const tag = element.localName;
    const allowed = ATTRIBUTES[tag];
    if (DROPPED.has(tag)) {
      element.remove();
      continue;
    }
    clean(element);
    if (allowed === undefined || (tag === 'a' && !SAFE_HREF.test(element.getAttribute('href') ?? '')) ||
      (tag === 'img' && !SAFE_IMAGE_SRC.test(element.getAttribute('src') ?? ''))) {
      element.replaceWith(...element.childNodes);
      continue;
    }
    for (const attribute of [...element.attributes]) {
      if (!allowed.includes(attribute.name) || !allowedValue(tag, attribute.name, attribute.value)) {
        element.removeAttribute(attribute.name);
      }
    }
  }
}

/** The HTML as a clean fragment of `doc`. */
export function sanitize(html: string, doc: Document): DocumentFragment {
  const template = doc.createElement('template');
  template.innerHTML = html;
  clean(template.content);
  return template.content;
}
