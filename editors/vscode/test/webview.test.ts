/**
 * The chat page in a real headless Chromium (Debian's `chromium`, driven by playwright-core;
 * no browser download), served with its production HTML and CSP. VS Code's side is the real
 * ChatController and ChatSession, talking to a scripted peer that replays a recorded chat
 * (test/fixtures/chat-recording.json); the webview host is test/fixtures/probe.js. Every
 * request the page makes goes through a route that serves only the page's own three files and
 * records anything else.
 *
 * Writes a screenshot of the view to out/chat.png (TRAMONTANE_SCREENSHOT names another path;
 * `npm run screenshot` refreshes media/chat.png).
 */

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type BrowserContext, chromium, type Page } from 'playwright-core';

import { ChatController, type ChatHost } from '../src/chat/controller';
import { chatHtml } from '../src/chat/html';
import type { EditorContext, ToView } from '../src/chat/messages';
import { ChatSession } from '../src/chat/session';
import { ChatStore, type Memento } from '../src/chat/store';
import { type Script, ScriptedPeer, type Step } from './chatpeer';
import { PACKAGE_ROOT } from './helpers';
import { png, terminalShot } from './png';

const CHROMIUM = process.env.TRAMONTANE_CHROMIUM ?? '/usr/bin/chromium';
const ORIGIN = 'https://tramontane-webview.test';
const PAGE = `${ORIGIN}/index.html`;
const FILES: Record<string, { path: string; type: string }> = {
  [`${ORIGIN}/dist/chat.js`]: { path: 'dist/chat.js', type: 'text/javascript' },
  [`${ORIGIN}/media/chat.css`]: { path: 'media/chat.css', type: 'text/css' },
};
const URI = 'file:///work/shop/server.py';
const SELECTION = { start: { line: 40, character: 0 }, end: { line: 58, character: 0 } };
const CONTEXT: EditorContext = {
  file: { uri: URI, label: 'server.py' },
  selection: { uri: URI, range: SELECTION, label: 'server.py:41-58' },
};

interface Recording {
  steps: Step[];
  result: Record<string, unknown>;
}

const recording = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'test/fixtures/chat-recording.json'),
  'utf8')) as Recording;

/** The recorded turn, with the reply naming the request's chat. */
function replay(extra: Step[] = []): Script {
  return (params) => [...extra, ...recording.steps,
    { result: { ...recording.result, chatId: params.chatId } }];
}

interface Probe {
  deliver(message: ToView): void;
  paste(files: FileSpec[]): void;
  drop(files: FileSpec[]): void;
  audit(): Audit;
  inject(): void;
  color(selector: string): string;
  focused(): string;
  scrollToTop(): void;
}

interface FileSpec {
  name: string;
  type: string;
  base64: string;
}

interface Audit {
  pwned: number;
  scripts: number;
  handlers: string[];
  hrefs: (string | null)[];
  images: string[];
  styles: number;
  text: string;
}

/** The page's global scope as the callbacks of page.evaluate see it (they run in the page, so
 * they name `__probe` through it rather than through a helper of this file). */
interface PageScope {
  __probe: Probe;
}

class MemoryMemento implements Memento {
  private value: unknown;
  get(): unknown {
    return this.value;
  }
  update(_key: string, value: unknown): Promise<void> {
    this.value = JSON.parse(JSON.stringify(value));
    return Promise.resolve();
  }
}

async function until(what: string, check: () => Promise<boolean> | boolean, ms = 10_000):
Promise<void> {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > ms) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    }
    await new Promise((done) => setTimeout(done, 20));
  }
}

/** One view: a page in Chromium, the real controller behind it, a scripted server behind that. */
class View {
  readonly peer: ScriptedPeer;
  readonly controller: ChatController;
  readonly outside: string[] = [];
  readonly console: string[] = [];
  readonly inserted: string[] = [];
  readonly copied: string[] = [];
  readonly opened: string[] = [];
  private delivery: Promise<unknown> = Promise.resolve();
  private ids = 0;

  private constructor(readonly page: Page, script: Script, maxImageBytes: number) {
    this.peer = new ScriptedPeer(script);
    const session = new ChatSession(this.peer.transport,
      { confirmEdit: () => Promise.resolve({ applied: false }) });
    session.attach(this.peer.registry);
    const host: ChatHost = {
      maxImageBytes: () => maxImageBytes,
      insert: (code) => { this.inserted.push(code); return Promise.resolve(); },
      copy: (code) => { this.copied.push(code); return Promise.resolve(); },
      openLink: (href) => { this.opened.push(href); return Promise.resolve(); },
      log: () => undefined,
      now: () => Date.now(),
      newId: () => `chat-${String(this.ids += 1)}`,
    };
    this.controller = new ChatController(session, new ChatStore(new MemoryMemento()), host);
    // VS Code's webview.postMessage: in order, one after the other.
    this.controller.setView({ post: (message) => {
      this.delivery = this.delivery.then(() => this.call('deliver', message));
    } });
  }

  static async open(context: BrowserContext, script: Script, maxImageBytes = 20 * 1024 * 1024):
  Promise<View> {
    const page = await context.newPage();
    page.setDefaultTimeout(10_000);
    const view = new View(page, script, maxImageBytes);
    page.on('console', (message) => { view.console.push(message.text()); });
    page.on('pageerror', (error) => { view.console.push(`pageerror: ${error.message}`); });
    await page.route('**/*', async (route) => {
      const url = route.request().url();
      const file = FILES[url];
      if (url === PAGE) {
        await route.fulfill({ contentType: 'text/html', body: chatHtml({ cspSource: ORIGIN,
          scriptUri: `${ORIGIN}/dist/chat.js`, styleUri: `${ORIGIN}/media/chat.css` }) });
      } else if (file !== undefined) {
        await route.fulfill({ contentType: file.type,
          body: readFileSync(join(PACKAGE_ROOT, file.path)) });
      } else {
        view.outside.push(url);
        await route.abort();
      }
    });
    await page.exposeFunction('__tramontanePost', (message: unknown) => {
      void view.controller.receive(message);
    });
    await page.addInitScript({ path: join(PACKAGE_ROOT, 'test/fixtures/probe.js') });
    await page.goto(PAGE);
    await view.settled();
    return view;
  }

  /** Resolves when every message posted so far has reached the page. */
  async settled(): Promise<void> {
    let seen: Promise<unknown> | undefined;
    while (seen !== this.delivery) {
      seen = this.delivery;
      await seen;
      await new Promise((done) => setTimeout(done, 30));
    }
  }

  async send(text: string): Promise<void> {
    await this.page.locator('.input').fill(text);
    await this.page.locator('.input').press('Enter');
  }

  async audit(): Promise<Audit> {
    return this.call('audit');
  }

  /** Calls one of probe.js's functions in the page. */
  async call<K extends keyof Probe>(name: K, ...args: Parameters<Probe[K]>):
  Promise<ReturnType<Probe[K]>> {
    const result: unknown = await this.page.evaluate(([fn, values]) => {
      const scope = globalThis as unknown as PageScope;
      return (scope.__probe[fn] as (...values: unknown[]) => unknown)(...values);
    }, [name, args] as [K, unknown[]]);
    return result as ReturnType<Probe[K]>;
  }

  /** CSP violations reported on the console. */
  violations(): string[] {
    return this.console.filter((line) => line.includes('Content Security Policy'));
  }

  async close(): Promise<void> {
    this.controller.setView(undefined);
    await this.delivery.catch(() => undefined); // a test that failed may leave one pending
    this.peer.dispose();
    await this.page.close();
  }
}

function file(name: string, type: string, bytes: Buffer): FileSpec {
  return { name, type, base64: bytes.toString('base64') };
}

describe('the chat page in headless Chromium', () => {
  let profile: string;
  let context: BrowserContext;

  before(async () => {
    if (!existsSync(CHROMIUM)) {
      throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install ` +
        'chromium) or set TRAMONTANE_CHROMIUM to a Chromium binary');
    }
    profile = mkdtempSync(join(tmpdir(), 'tramontane-chromium-'));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync'],
      viewport: { width: 400, height: 940 },
      deviceScaleFactor: 2,
      colorScheme: 'dark',
      timeout: 30_000,
    });
  });

  after(async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  });

  test('a recorded chat streams in: Markdown, highlighted code, tool steps, then done', async () => {
    let release = (): void => undefined;
    const gate = new Promise<void>((done) => { release = done; });
    const steps = recording.steps;
    const view = await View.open(context, (params) => [...steps.slice(0, 30), { until: gate },
      ...steps.slice(30), { result: { ...recording.result, chatId: params.chatId } }]);
    try {
      const { page } = view;
      await view.send('Why does parse_header fail on empty lines?');
      // Mid-stream: the tool steps so far, the Stop button, no final text yet.
      await page.locator('details.tool').nth(2).waitFor();
      await until('the stream to pause', () => view.peer.requests.length === 1);
      await view.settled();
      assert.equal(await page.locator('button.stop').isVisible(), true);
      assert.equal(await page.locator('button.send').isVisible(), false);
      assert.equal(await page.locator('.code-block').count(), 0);
      release();
      await page.locator('button.send').waitFor({ state: 'visible' });
      await view.settled();

      const reply = (recording.result.message as { content: string }).content;
      const answer = await page.locator('.msg.assistant .md').allTextContents();
      assert.equal(answer.join('').replace(/InsertCopy|python/g, '').replace(/\s+/g, ' ').trim()
        .startsWith('Let me look at the function'), true);
      assert.deepEqual(await page.locator('.md strong').allTextContents(), ['no colon']);
      assert.deepEqual(await page.locator('.md ol > li').count(), 2);
      assert.equal(await page.locator('.code-lang').textContent(), 'python');
      assert.deepEqual(await page.locator('.code-block .hljs-keyword').allTextContents(),
        ['def', 'for', 'in', 'if', 'not', 'break', 'return']);
      assert.equal(await page.locator('.code-block code').textContent(),
        /```python\n([\s\S]*?)```/.exec(reply)?.[1]);

      const tools = page.locator('details.tool');
      assert.deepEqual(await page.locator('.tool-name').allTextContents(),
        ['read_file', 'search_text', 'read_file']);
      assert.equal(await page.locator('.tool-args').first().textContent(),
        'path: server.py, startLine: 41, endLine: 58');
      assert.equal(await tools.first().getAttribute('open'), null); // collapsed
      await tools.first().locator('summary').click();
      assert.match(await tools.first().locator('.tool-pre').last().textContent() ?? '',
        /^41 def parse_header\(lines\):/);
      assert.equal(await tools.nth(2).getAttribute('class'), 'tool failed');
      await tools.nth(2).locator('summary').click();
      assert.equal(await page.locator('.tool-pre.error').textContent(),
        'refused: .env is a secret file (chat.deniedPaths and the built-in list)');
      assert.equal(await view.call('color', '.tool-pre.error'), 'rgb(248, 81, 73)');

      // The controller's copy of the conversation is what the page shows.
      const turn = view.controller.currentChat.turns[0];
      assert.equal(turn?.assistant.status, 'stop');
      assert.equal(turn.assistant.steps.filter((s) => s.kind === 'tool').length, 3);

      await page.locator('.code-action.copy').click();
      await page.locator('.code-action.insert').click();
      await until('the code actions', () => view.inserted.length === 1);
      const code = /```python\n([\s\S]*?)```/.exec(reply)?.[1];
      assert.deepEqual(view.copied, [code]);
      assert.deepEqual(view.inserted, [code]);
      assert.equal(await page.locator('.code-action.copy span').textContent(), 'Copied');
      assert.deepEqual(view.outside, []);
      assert.deepEqual(view.violations(), []);
    } finally {
      await view.close();
    }
  });

  test('a pasted screenshot: a removable thumbnail, sent as a data: image part', async () => {
    const view = await View.open(context, replay());
    try {
      const { page } = view;
      const shot = terminalShot();
      const url = `data:image/png;base64,${shot.toString('base64')}`;
      await view.call('paste', [file('image.png', 'image/png', shot)]);
      await page.locator('.image-chip img').waitFor();
      assert.equal(await page.locator('.image-chip img').getAttribute('src'), url);
      await page.locator('.image-remove').click();
      assert.equal(await page.locator('.image-chip').count(), 0);

      // Dropped as a file this time, then sent.
      await view.call('drop', [file('trace.png', 'image/png', shot)]);
      await page.locator('.image-chip img').waitFor();
      await view.send('What is this error?');
      await until('the request', () => view.peer.requests.length === 1);
      assert.deepEqual(view.peer.requests[0]?.messages, [{ role: 'user', content: [
        { type: 'text', text: 'What is this error?' }, { type: 'image_url', image_url: { url } }] }]);
      await page.locator('.bubble-images img').waitFor();
      assert.equal(await page.locator('.bubble-images img').getAttribute('src'), url);
      assert.equal(await page.locator('.image-chip').count(), 0);
      assert.deepEqual(view.outside, []);
    } finally {
      await view.close();
    }
  });

  test('an image over the limit, or a model without vision: a clear message, nothing sent', async () => {
    const shot = png(64, 64, (x, y) => [x * 4, y * 4, 128]);
    const view = await View.open(context, () => [{ error: { code: -32602,
      message: 'This model has no vision encoder: it cannot read images.' } }], shot.length - 1);
    try {
      const { page } = view;
      await view.call('paste', [file('big.png', 'image/png', shot)]);
      await page.locator('.notice').waitFor();
      assert.equal(await page.locator('.notice-text').textContent(),
        'big.png is 0.0 MiB, over the 0.0 MiB limit (tramontane.chat.maxImageMiB): it was not attached.');
      assert.equal(await page.locator('.image-chip').count(), 0);
      await page.locator('.notice .icon-button').click();
      assert.equal(await page.locator('.notice').isVisible(), false);

      const small = png(8, 8, () => [255, 0, 0]);
      await view.call('paste', [file('small.png', 'image/png', small)]);
      await page.locator('.image-chip img').waitFor();
      await view.send('Read this');
      await page.locator('.notice').waitFor();
      assert.equal(await page.locator('.notice-text').textContent(),
        'Not sent: This model has no vision encoder: it cannot read images.');
      // The turn is taken back; the draft (text and image) is back in the input.
      await view.settled();
      assert.equal(await page.locator('section.turn').count(), 0);
      assert.equal(await page.locator('.input').inputValue(), 'Read this');
      assert.equal(await page.locator('.image-chip').count(), 1);
      assert.equal(view.peer.requests.length, 1);
    } finally {
      await view.close();
    }
  });

  test('Stop cancels the request; the partial answer stays, marked stopped', async () => {
    const view = await View.open(context, () => [{ text: 'Reading the ' }, { text: 'file…' },
      { waitForCancel: { ms: 10_000 } }]);
    try {
      const { page } = view;
      await view.send('Explain everything');
      await page.locator('button.stop').waitFor({ state: 'visible' });
      await until('the partial answer', async () =>
        (await page.locator('.md').textContent())?.trim() === 'Reading the file…');
      await page.locator('button.stop').click();
      await page.locator('.note').waitFor({ state: 'visible' });
      assert.equal(await page.locator('.note').textContent(), 'Stopped.');
      assert.equal(await page.locator('button.send').isVisible(), true);
      assert.equal(await page.locator('.typing').isVisible(), false);
      assert.deepEqual(view.peer.cancelled, [view.controller.currentChat.id]);
      assert.equal(view.controller.currentChat.turns[0]?.assistant.status, 'cancelled');
    } finally {
      await view.close();
    }
  });

  test('hostile Markdown is rendered inert: no script, handler, command link or remote image', async () => {
    const hostile = [
      'Hostile answer.',
      '<script>window.__pwned = 1</script>',
      '<img src=x onerror="window.__pwned = 2">',
      '[run a command](command:workbench.action.terminal.new)',
      '[javascript](javascript:window.__pwned=3)',
      '[vscode uri](vscode://settings/tramontane)',
      '<a href="command:x">raw anchor</a>',
      '![tracker](https://evil.test/track.png)',
      '![tracker2](//evil.test/track2.png)',
      '[data page](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX19wd25lZD00PC9zY3JpcHQ+)',
      '<iframe src="https://evil.test/frame"></iframe>',
      '<svg onload="window.__pwned=5"></svg>',
      '[titled](https://mistral.ai "x\\" onmouseover=\\"window.__pwned=6")',
      '```python" onmouseover="window.__pwned=7',
      'print(1)',
      '```',
      '[a real link](https://mistral.ai/news)',
    ].join('\n\n');
    const view = await View.open(context, () => [{ text: hostile }]);
    try {
      const { page } = view;
      await view.send('Say something nasty');
      await page.locator('button.send').waitFor({ state: 'visible' });
      await view.settled();
      await page.locator('.md').first().hover();
      await page.locator('.md a').first().hover();
      const audit = await view.audit();
      assert.equal(audit.pwned, 0);
      assert.equal(audit.scripts, 0);
      assert.deepEqual(audit.handlers, []);
      assert.deepEqual(audit.hrefs, ['https://mistral.ai', 'https://mistral.ai/news']);
      assert.deepEqual(audit.images, []);
      assert.equal(audit.styles, 0);
      // The markup is shown as text; the refused links stay as their Markdown source.
      assert.match(audit.text, /<script>window.__pwned = 1<\/script>/);
      assert.match(audit.text, /\[run a command\]\(command:workbench.action.terminal.new\)/);
      assert.match(audit.text, /\[image: tracker\]/);
      assert.deepEqual(view.outside, []);
      assert.deepEqual(view.violations(), []);

      await page.locator('.md a', { hasText: 'a real link' }).click();
      await until('the link', () => view.opened.length === 1);
      assert.deepEqual(view.opened, ['https://mistral.ai/news']);
    } finally {
      await view.close();
    }
  });

  test('the CSP stops what sanitising would not: inline script, handlers, remote images', async () => {
    const view = await View.open(context, replay());
    try {
      await view.call('inject');
      await new Promise((done) => setTimeout(done, 200));
      assert.equal((await view.audit()).pwned, 0);
      assert.deepEqual(view.outside, []); // the beacon never reached the network
      const violations = view.violations();
      assert.equal(violations.length, 3, violations.join('\n'));
      assert.match(violations.join('\n'), /the image 'https:\/\/evil\.test\/beacon\.png' violates the following Content Security Policy directive: "img-src data:"/);
    } finally {
      await view.close();
    }
  });

  test('context chips: the file on by default, the selection, both removable; the draft survives', async () => {
    const view = await View.open(context, replay());
    try {
      const { page } = view;
      view.controller.setContext(CONTEXT, true);
      await view.settled();
      assert.deepEqual(await page.locator('.attachments .chip-label').allTextContents(),
        ['server.py', 'server.py:41-58']);
      assert.equal(await view.call('focused'), 'input');

      // The view is hidden and shown again: VS Code re-creates the page from its state.
      await page.locator('.input').fill('half-written question');
      await page.locator('.selection-chip .chip-remove').click();
      await page.reload();
      await view.settled();
      assert.equal(await page.locator('.input').inputValue(), 'half-written question');
      assert.deepEqual(await page.locator('.attachments .chip-label').allTextContents(),
        ['server.py']);

      await page.locator('.input').press('Enter');
      await until('the request', () => view.peer.requests.length === 1);
      assert.deepEqual(view.peer.requests[0]?.context, { uri: URI });
      await page.locator('button.send').waitFor({ state: 'visible' });
      await view.settled();
      assert.equal(await page.locator('.bubble-context .chip-label').textContent(), 'server.py');

      await page.locator('.file-chip .chip-remove').click();
      assert.equal(await page.locator('.attachments').isVisible(), false);
      await view.send('And without context?');
      await until('the second request', () => view.peer.requests.length === 2);
      assert.equal(view.peer.requests[1]?.context, undefined);
    } finally {
      await view.close();
    }
  });

  test('conversations: New chat, the list, opening and deleting one', async () => {
    const view = await View.open(context, () => [{ text: 'Answer.' }]);
    try {
      const { page } = view;
      await view.send('First question');
      await until('the first answer', () => view.controller.currentChat.turns[0]?.assistant.status === 'stop');
      await page.locator('#new-chat').click();
      await page.locator('.empty').waitFor();
      await view.send('Second question');
      await until('the second answer', () => view.controller.conversations.length === 2 &&
        view.controller.currentChat.turns[0]?.assistant.status === 'stop');
      await page.locator('.title-button').click();
      await view.settled();
      assert.deepEqual(await page.locator('.history-title').allTextContents(),
        ['Second question', 'First question']);
      await page.locator('.history-open', { hasText: 'First question' }).click();
      await view.settled();
      assert.equal(await page.locator('.title-text').textContent(), 'First question');
      assert.equal(await page.locator('.user-text').textContent(), 'First question');

      await page.locator('.title-button').click();
      await page.locator('.history-item', { hasText: 'First question' }).hover();
      await page.locator('.history-item', { hasText: 'First question' }).locator('.history-delete').click();
      await until('chatClose', () => view.peer.closed.length === 1);
      await view.settled();
      assert.deepEqual(view.peer.closed, ['chat-1']);
      assert.deepEqual(await page.locator('.history-title').allTextContents(), ['Second question']);
      assert.equal(await page.locator('.empty').isVisible(), true);
    } finally {
      await view.close();
    }
  });

  test('screenshot of the view', async () => {
    const view = await View.open(context, replay());
    try {
      const { page } = view;
      const shot = `data:image/png;base64,${terminalShot().toString('base64')}`;
      view.controller.setContext(CONTEXT);
      await view.settled();
      await view.call('paste', [{ name: 'traceback.png', type: 'image/png', base64: shot.slice(22) }]);
      await page.locator('.image-chip').waitFor();
      await view.send('Why does parse_header fail on empty lines? The test crashes like this:');
      await page.locator('button.send').waitFor({ state: 'visible' });
      await until('the answer', () => view.controller.currentChat.turns[0]?.assistant.status === 'stop');
      await view.settled();
      await page.locator('.selection-chip .chip-remove').click();
      await page.locator('.input').fill('Can you propose the edit?');
      await page.locator('.input').blur();
      await page.mouse.move(0, 0);
      await view.call('scrollToTop');
      const target = process.env.TRAMONTANE_SCREENSHOT ?? join(PACKAGE_ROOT, 'out', 'chat.png');
      mkdirSync(dirname(resolve(target)), { recursive: true });
      writeFileSync(target, await page.screenshot({ animations: 'disabled' }));
      assert.equal(readFileSync(target).subarray(1, 4).toString('latin1'), 'PNG');
      assert.deepEqual(view.violations(), []);
    } finally {
      await view.close();
    }
  });
});
