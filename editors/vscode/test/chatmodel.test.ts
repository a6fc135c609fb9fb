/** The conversation model, the edit confirmation rewrite, the storage bound, the page's HTML. */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { editorContext, selectionLabel } from '../src/chat/context';
import { formatProblems, MAX_PROBLEMS, type Problem, requestedPath } from '../src/chat/diagnostics';
import { ANNOTATION_ID, editedUris, needsConfirmation, requireConfirmation } from '../src/chat/edits';
import { chatHtml, contentSecurityPolicy } from '../src/chat/html';
import { dataUriBytes, dataUriProblem, imageProblem, MIB } from '../src/chat/images';
import { isSafeLink, parseFromView } from '../src/chat/messages';
import { applyDelta, type AssistantEntry, type Conversation, history, titleOf, type Turn,
  userMessage } from '../src/chat/model';
import { formatArguments, parseDelta, parseResult } from '../src/chat/protocol';
import { bound, ChatStore, type Memento, STORAGE_KEY } from '../src/chat/store';

const RANGE = { start: { line: 0, character: 0 }, end: { line: 0, character: 3 } };
const PNG = 'data:image/png;base64,iVBORw0KGgo=';

function turn(text: string, reply: string | undefined, status: Turn['assistant']['status'] = 'stop',
  images: string[] = []): Turn {
  const t: Turn = { user: { text, images }, assistant: { steps: reply === undefined ? [] :
    [{ kind: 'text', text: reply }], status } };
  if (status === 'stop' && reply !== undefined) {
    t.messages = [{ role: 'assistant', content: reply }];
  }
  return t;
}

describe('conversation model', () => {
  test('deltas: text appends, a tool call opens a step, its result completes it', () => {
    const entry: AssistantEntry = { steps: [], status: 'streaming' };
    for (const delta of [
      { chatId: 'c', kind: 'text', text: 'a' },
      { chatId: 'c', kind: 'text', text: 'b' },
      { chatId: 'c', kind: 'toolCall', toolCall: { id: '1', name: 'list_files', arguments: {} } },
      { chatId: 'c', kind: 'text', text: 'c' },
      { chatId: 'c', kind: 'toolResult', toolResult: { id: '1', content: 'x.py', isError: false } },
      { chatId: 'c', kind: 'toolResult', toolResult: { id: '9', content: 'orphan', isError: true } },
    ]) {
      const parsed = parseDelta(delta);
      assert.ok(parsed !== undefined);
      applyDelta(entry, parsed);
    }
    assert.deepEqual(entry.steps, [
      { kind: 'text', text: 'ab' },
      { kind: 'tool', id: '1', name: 'list_files', arguments: {}, result: 'x.py', isError: false },
      { kind: 'text', text: 'c' },
      { kind: 'tool', id: '9', name: '(unknown tool)', arguments: {}, result: 'orphan', isError: true },
    ]);
  });

  test('malformed deltas and results are refused', () => {
    assert.equal(parseDelta({ chatId: 'c', kind: 'text' }), undefined);
    assert.equal(parseDelta({ kind: 'text', text: 'x' }), undefined);
    assert.equal(parseDelta({ chatId: 'c', kind: 'toolCall', toolCall: { id: 1, name: 'x' } }), undefined);
    assert.equal(parseDelta({ chatId: 'c', kind: 'shout', text: 'x' }), undefined);
    assert.throws(() => parseResult(null), { message: 'malformed tramontane/chat result: null' });
    assert.deepEqual(parseResult({ chatId: 'c', message: { content: 'hi' }, finishReason: 'odd' }), {
      chatId: 'c', message: { role: 'assistant', content: 'hi' },
      messages: [{ role: 'assistant', content: 'hi' }], finishReason: 'stop' });
  });

  test('the wire history: answered turns with the server\'s messages, stopped turns with their partial text', () => {
    const answered = turn('q1', 'a1');
    answered.messages = [{ role: 'assistant', content: '', tool_calls: [{ id: 't' }] },
      { role: 'tool', content: 'r', tool_call_id: 't' }, { role: 'assistant', content: 'a1' }];
    assert.deepEqual(history([
      answered,
      turn('q2', 'half an ans', 'cancelled'),
      turn('q3', undefined, 'cancelled'),
      turn('q4', 'broken', 'error'),
      turn('q5', '', 'stop', [PNG]),
    ]), [
      { role: 'user', content: 'q1' }, ...answered.messages,
      { role: 'user', content: 'q2' }, { role: 'assistant', content: 'half an ans' },
      { role: 'user', content: [{ type: 'text', text: 'q5' }, { type: 'image_url', image_url: { url: PNG } }] },
      { role: 'assistant', content: '' },
    ]);
    assert.deepEqual(userMessage({ text: '', images: [PNG] }),
      { role: 'user', content: [{ type: 'image_url', image_url: { url: PNG } }] });
  });

  test('the user message goes back as the model read it (the server\'s userMessage, with the context)', () => {
    const answered = turn('q1', 'a1');
    answered.messages = [{ role: 'assistant', content: 'a1' }];
    answered.sent = { role: 'user', content: '/w/a.py:\n```python\nx = 1\n```\n\nq1' };
    assert.deepEqual(history([answered]), [answered.sent, { role: 'assistant', content: 'a1' }]);
    const result = parseResult({ chatId: 'c', message: { content: 'a1' }, finishReason: 'stop',
      messages: answered.messages, userMessage: answered.sent });
    assert.deepEqual(result.userMessage, answered.sent);
    assert.equal(parseResult({ chatId: 'c', message: { content: 'a1' },
      userMessage: { role: 'assistant', content: 'not a user message' } }).userMessage, undefined);
  });

  test('titles: first line, shortened; an image alone is "Image"', () => {
    assert.equal(titleOf({ text: '  Why does\nthis fail?', images: [] }), 'Why does');
    assert.equal(titleOf({ text: 'x'.repeat(80), images: [] }), `${'x'.repeat(59)}…`);
    assert.equal(titleOf({ text: ' ', images: [PNG] }), 'Image');
  });

  test('tool arguments are shown as pretty JSON', () => {
    assert.equal(formatArguments('{"path":"a"}'), '{\n  "path": "a"\n}');
    assert.equal(formatArguments({ n: 1 }), '{\n  "n": 1\n}');
    assert.equal(formatArguments('not json'), 'not json');
  });
});

describe('edits need confirmation', () => {
  test('a plain changes map becomes annotated documentChanges', () => {
    const edit = { changes: { 'file:///a.py': [{ range: RANGE, newText: 'x' }] } };
    const confirmed = requireConfirmation(edit);
    assert.equal(needsConfirmation(edit), false);
    assert.equal(needsConfirmation(confirmed), true);
    assert.deepEqual(confirmed.changeAnnotations, { [ANNOTATION_ID]: {
      label: 'Tramontane: proposed edit', needsConfirmation: true, description: 'proposed in the chat' } });
  });

  test('the server\'s own annotation is kept and forced to need confirmation; file operations too', () => {
    const edit = {
      documentChanges: [
        { textDocument: { uri: 'file:///a.py', version: 3 },
          edits: [{ range: RANGE, newText: 'x', annotationId: 'srv' }, { range: RANGE, newText: 'y' }] },
        { kind: 'create' as const, uri: 'file:///b.py' },
      ],
      changeAnnotations: { srv: { label: 'propose_edit', needsConfirmation: false } },
    };
    const confirmed = requireConfirmation(edit, 'from the chat');
    assert.deepEqual(confirmed, {
      documentChanges: [
        { textDocument: { uri: 'file:///a.py', version: 3 }, edits: [
          { range: RANGE, newText: 'x', annotationId: 'srv' },
          { range: RANGE, newText: 'y', annotationId: ANNOTATION_ID }] },
        { kind: 'create', uri: 'file:///b.py', annotationId: ANNOTATION_ID },
      ],
      changeAnnotations: {
        srv: { label: 'propose_edit', needsConfirmation: true },
        [ANNOTATION_ID]: { label: 'from the chat', needsConfirmation: true,
          description: 'proposed in the chat' },
      },
    });
    assert.deepEqual(editedUris(confirmed), ['file:///a.py', 'file:///b.py']);
  });
});

describe('images and links', () => {
  test('data URI sizes and the limit', () => {
    assert.equal(dataUriBytes(PNG), 8);
    assert.equal(dataUriBytes('data:image/png;base64,QUJD'), 3);
    assert.equal(dataUriBytes('data:image/svg+xml;base64,QUJD'), undefined);
    assert.equal(dataUriBytes('https://example.com/a.png'), undefined);
    assert.equal(imageProblem('shot.png', 'image/png', 21 * MIB, 20 * MIB),
      'shot.png is 21.0 MiB, over the 20.0 MiB limit (tramontane.chat.maxImageMiB): it was not attached.');
    assert.equal(imageProblem('a.svg', 'image/svg+xml', 10, 20 * MIB),
      'a.svg is not an image the model can read (PNG, JPEG, GIF or WebP).');
    assert.equal(dataUriProblem('shot.png', PNG, 8), undefined);
    assert.match(dataUriProblem('shot.png', PNG, 7) ?? '', /^shot.png is 0.0 MiB, over the/);
  });

  test('only web and mail links may be opened', () => {
    assert.equal(isSafeLink('https://mistral.ai'), true);
    assert.equal(isSafeLink('mailto:a@b.c'), true);
    for (const bad of ['command:workbench.action.terminal.new', 'vscode://x', 'javascript:alert(1)',
      'file:///etc/passwd', 'data:text/html,x', ' command:x']) {
      assert.equal(isSafeLink(bad), false, bad);
    }
  });

  test('messages from the page are checked', () => {
    assert.deepEqual(parseFromView({ type: 'send', text: 'hi', images: [] }),
      { type: 'send', text: 'hi', images: [] });
    assert.deepEqual(parseFromView({ type: 'send', text: 'hi', images: [],
      context: { uri: 'file:///a', label: 'a', range: RANGE } }),
    { type: 'send', text: 'hi', images: [], context: { uri: 'file:///a', range: RANGE, label: 'a' } });
    assert.equal(parseFromView({ type: 'send', text: 'hi', images: [{ url: 1 }] }), undefined);
    assert.equal(parseFromView({ type: 'send', text: 'hi', images: [],
      context: { uri: 'file:///a', label: 'a', range: { start: 1 } } }), undefined);
    assert.equal(parseFromView({ type: 'runCommand', command: 'x' }), undefined);
    assert.equal(parseFromView('ready'), undefined);
  });
});

describe('the page and its content security policy', () => {
  test('the policy allows the nonce\'d script, own styles and data: images only', () => {
    assert.equal(contentSecurityPolicy('https://x.vscode-cdn.net', 'N0NCE'),
      "default-src 'none'; script-src 'nonce-N0NCE'; style-src https://x.vscode-cdn.net " +
      "'nonce-N0NCE'; img-src data:; base-uri 'none'; form-action 'none'; frame-src 'none'");
  });

  test('the page loads one script and one stylesheet, both with the nonce', () => {
    const html = chatHtml({ cspSource: 'https://x', scriptUri: 'https://x/chat.js',
      styleUri: 'https://x/chat.css', nonce: 'abc' });
    assert.deepEqual([...html.matchAll(/<script[^>]*>/g)].map((m) => m[0]),
      ['<script nonce="abc" src="https://x/chat.js">']);
    assert.deepEqual([...html.matchAll(/<link[^>]*>/g)].map((m) => m[0]),
      ['<link rel="stylesheet" nonce="abc" href="https://x/chat.css">']);
    assert.match(html, /<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'nonce-abc';/);
    assert.doesNotMatch(chatHtml({ cspSource: 'a', scriptUri: 'b', styleUri: 'c' }), /nonce="abc"/);
  });
});

function chat(id: string, updated: number, turns: Turn[] = [turn('q', 'a')]): Conversation {
  return { id, title: id, updated, turns };
}

class MemoryMemento implements Memento {
  readonly values = new Map<string, unknown>();
  get(key: string): unknown {
    return this.values.get(key);
  }
  update(key: string, value: unknown): Promise<void> {
    this.values.set(key, JSON.parse(JSON.stringify(value)));
    return Promise.resolve();
  }
}

describe('the storage bound', () => {
  test('at most maxChats, newest first; the open one is always kept', () => {
    const chats = [chat('a', 1), chat('b', 4), chat('c', 3), chat('d', 2)];
    const result = bound(chats, 'a', { maxChats: 2, maxBytes: 1e9 });
    assert.deepEqual(result.kept.map((c) => c.id), ['a', 'b']);
    assert.deepEqual(result.evicted, ['c', 'd']);
  });

  test('over the byte budget: images are dropped first, then old conversations', () => {
    const big = `data:image/png;base64,${'A'.repeat(4000)}`;
    const chats = [chat('new', 3, [turn('look', 'ok', 'stop', [big])]), chat('mid', 2,
      [turn('see', 'ok', 'stop', [big])]), chat('old', 1, [turn('x'.repeat(3000), 'y')])];
    const result = bound(chats, undefined, { maxChats: 10, maxBytes: 5000 });
    assert.deepEqual(result.kept.map((c) => c.id), ['new', 'mid']);
    assert.deepEqual(result.evicted, ['old']);
    assert.deepEqual(result.stored[0]?.turns[0]?.user.images, [big]);
    assert.deepEqual(result.stored[1]?.turns[0]?.user, { text: 'see', images: [], droppedImages: 1 });
    // The kept conversation itself still has its image until the window reloads.
    assert.deepEqual(result.kept[1]?.turns[0]?.user.images, [big]);
  });

  test('the store writes the bounded list and reads back only conversations', async () => {
    const memento = new MemoryMemento();
    const store = new ChatStore(memento, { maxChats: 1, maxBytes: 1e9 });
    const { evicted } = await store.save([chat('a', 1), chat('b', 2)], undefined);
    assert.deepEqual(evicted, ['a']);
    assert.deepEqual(store.load().map((c) => c.id), ['b']);
    memento.values.set(STORAGE_KEY, [{ id: 'x' }, chat('ok', 1), 'junk']);
    assert.deepEqual(store.load().map((c) => c.id), ['ok']);
    memento.values.set(STORAGE_KEY, { not: 'a list' });
    assert.deepEqual(store.load(), []);
  });
});

describe('editor context and the diagnostics tool', () => {
  test('chips: the file, and the selection with 1-based lines', () => {
    const selection = { start: { line: 40, character: 4 }, end: { line: 58, character: 0 } };
    assert.deepEqual(editorContext({ uri: 'file:///w/server.py', scheme: 'file', name: 'server.py',
      selection }), {
      file: { uri: 'file:///w/server.py', label: 'server.py' },
      selection: { uri: 'file:///w/server.py', range: selection, label: 'server.py:41-58' },
    });
    assert.deepEqual(editorContext({ uri: 'untitled:Untitled-1', scheme: 'untitled',
      name: 'Untitled-1', selection: { start: { line: 2, character: 1 }, end: { line: 2, character: 1 } } }),
    { file: { uri: 'untitled:Untitled-1', label: 'Untitled-1' } });
    assert.deepEqual(editorContext({ uri: 'output:x', scheme: 'output', name: 'x' }), {});
    assert.deepEqual(editorContext(undefined), {});
    assert.equal(selectionLabel('a.py', { start: { line: 3, character: 2 }, end: { line: 3, character: 9 } }), 'a.py:4');
  });

  test('diagnostics: errors first, one line each, bounded; arguments checked', () => {
    const problem = (path: string, line: number, severity: Problem['severity']): Problem =>
      ({ path, line, character: 0, severity, message: `m${String(line)}\n  more`, source: 'ruff' });
    assert.equal(formatProblems([problem('b.py', 3, 'warning'), problem('a.py', 9, 'error')], undefined),
      'a.py:10:1: error: m9 more [ruff]\nb.py:4:1: warning: m3 more [ruff]');
    assert.equal(formatProblems([], 'a.py'), 'No problems reported in a.py.');
    const many = Array.from({ length: MAX_PROBLEMS + 5 }, (_, i) => problem('a.py', i, 'hint'));
    const lines = formatProblems(many, undefined).split('\n');
    assert.equal(lines.length, MAX_PROBLEMS + 1);
    assert.equal(lines.at(-1), '… and 5 more');
    assert.equal(requestedPath({ path: './src/a.py' }), 'src/a.py');
    assert.equal(requestedPath('{"path": "b.py"}'), 'b.py');
    assert.equal(requestedPath({}), undefined);
    assert.throws(() => requestedPath({ path: 3 }), { message: 'path must be a string' });
  });
});
