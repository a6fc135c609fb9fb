/**
 * The extension side of the chat view: the page's messages in, turns on the (scripted) server,
 * what the page is sent back, and what survives a reload.
 */

import assert from 'node:assert/strict';
import { afterEach, describe, test } from 'node:test';

import { type ChatHost, ChatController } from '../src/chat/controller';
import type { ToView } from '../src/chat/messages';
import type { Conversation } from '../src/chat/model';
import { ChatSession } from '../src/chat/session';
import { ChatStore, type Limits, type Memento, STORAGE_KEY } from '../src/chat/store';
import { type Script, ScriptedPeer } from './chatpeer';
import { within } from './helpers';

const PNG = 'data:image/png;base64,iVBORw0KGgo=';
const URI = 'file:///work/app.py';
const RANGE = { start: { line: 2, character: 0 }, end: { line: 4, character: 0 } };

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

class Rig {
  readonly peer: ScriptedPeer;
  readonly posted: ToView[] = [];
  readonly logs: string[] = [];
  readonly inserted: string[] = [];
  readonly copied: string[] = [];
  readonly opened: string[] = [];
  readonly controller: ChatController;
  private ids = 0;
  private clock = 1000;

  constructor(script: Script, readonly memento = new MemoryMemento(), limits?: Limits,
    maxImageBytes = 1024) {
    this.peer = new ScriptedPeer(script);
    const session = new ChatSession(this.peer.transport,
      { confirmEdit: () => Promise.resolve({ applied: false }) });
    session.attach(this.peer.registry);
    const host: ChatHost = {
      maxImageBytes: () => maxImageBytes,
      insert: (code) => { this.inserted.push(code); return Promise.resolve(); },
      copy: (code) => { this.copied.push(code); return Promise.resolve(); },
      openLink: (href) => { this.opened.push(href); return Promise.resolve(); },
      log: (line) => { this.logs.push(line); },
      now: () => (this.clock += 1),
      newId: () => `chat-${String(this.ids += 1)}`,
    };
    this.controller = new ChatController(session, new ChatStore(memento, limits), host);
    // Like postMessage, the page gets a copy.
    this.controller.setView({ post: (m) => { this.posted.push(structuredClone(m)); } });
  }

  types(): string[] {
    return this.posted.map((m) => m.type);
  }

  last<T extends ToView['type']>(type: T): Extract<ToView, { type: T }> {
    const found = this.posted.filter((m): m is Extract<ToView, { type: T }> => m.type === type).at(-1);
    assert.ok(found !== undefined, `no ${type} posted (got ${this.types().join(', ')})`);
    return found;
  }

  stored(): Conversation[] {
    return this.memento.values.get(STORAGE_KEY) as Conversation[];
  }
}

describe('chat controller', () => {
  let rig: Rig | undefined;
  const open = (...args: ConstructorParameters<typeof Rig>): Rig => {
    rig = new Rig(...args);
    return rig;
  };
  afterEach(() => { rig?.peer.dispose(); });

  test('a turn: turnStart, the deltas as they came, turnEnd; stored; the next turn carries the history', async () => {
    const r = open(() => [{ text: 'It ' }, { text: 'adds.' }]);
    await r.controller.receive({ type: 'ready' });
    assert.deepEqual(r.types(), ['state', 'context']);
    await r.controller.receive({ type: 'send', text: 'What does this do?', images: [PNG].map((url) =>
      ({ name: 'shot.png', url })), context: { uri: URI, range: RANGE, label: 'app.py:3-4' } });
    assert.deepEqual(r.types().slice(2), ['turnStart', 'chats', 'delta', 'delta', 'turnEnd']);
    assert.deepEqual(r.last('chats').chats.map((c) => c.title), ['What does this do?']);
    assert.deepEqual(r.last('turnEnd'), { type: 'turnEnd', chatId: 'chat-1', status: 'stop' });
    assert.deepEqual(r.peer.requests[0], { chatId: 'chat-1', context: { uri: URI, range: RANGE },
      messages: [{ role: 'user', content: [{ type: 'text', text: 'What does this do?' },
        { type: 'image_url', image_url: { url: PNG } }] }] });

    r.peer.setScript(() => [{ text: 'Yes.' }]);
    await r.controller.receive({ type: 'send', text: 'Sure?', images: [] });
    assert.deepEqual(r.peer.requests[1]?.messages.slice(1), [
      { role: 'assistant', content: 'It adds.' }, { role: 'user', content: 'Sure?' }]);
    assert.equal(r.peer.requests[1].context, undefined);
    await r.controller.flush();
    const [stored] = r.stored();
    assert.equal(stored?.title, 'What does this do?');
    assert.deepEqual(stored.turns.map((t) => [t.user.text, t.assistant.steps, t.assistant.status]), [
      ['What does this do?', [{ kind: 'text', text: 'It adds.' }], 'stop'],
      ['Sure?', [{ kind: 'text', text: 'Yes.' }], 'stop'],
    ]);
    assert.deepEqual(stored.turns[0]?.user.context, { uri: URI, range: RANGE, label: 'app.py:3-4' });
  });

  test('an image over tramontane.chat.maxImageMiB: a message, the draft back, nothing sent', async () => {
    const r = open(() => [{ text: 'never' }], undefined, undefined, 4);
    await r.controller.receive({ type: 'send', text: 'look', images: [{ name: 'shot.png', url: PNG }] });
    assert.deepEqual(r.posted, [{ type: 'turnFailed', chatId: 'chat-1', text: 'look',
      images: [{ name: 'shot.png', url: PNG }], withdrawn: false,
      message: 'Nothing was sent: shot.png is 0.0 MiB, over the 0.0 MiB limit ' +
        '(tramontane.chat.maxImageMiB): it was not attached.' }]);
    assert.deepEqual(r.peer.requests, []);
    assert.equal(r.controller.conversations.length, 0);
  });

  test('the server refuses (no vision encoder): the turn is taken back with its message', async () => {
    const r = open(() => [{ error: { code: -32602,
      message: 'The model has no vision encoder: it cannot read images.' } }]);
    await r.controller.receive({ type: 'send', text: 'look', images: [{ name: 'a.png', url: PNG }] });
    assert.deepEqual(r.types(), ['turnStart', 'chats', 'turnFailed', 'chats']);
    assert.deepEqual(r.last('chats').chats, []);
    assert.deepEqual(r.last('turnFailed'), { type: 'turnFailed', chatId: 'chat-1', withdrawn: true,
      message: 'Not sent: The model has no vision encoder: it cannot read images.',
      text: 'look', images: [{ name: 'a.png', url: PNG }] });
    await r.controller.flush();
    assert.deepEqual(r.controller.currentChat.turns, []);
    assert.deepEqual(r.stored(), []);
  });

  test('Stop cancels the running turn; its partial answer stays, marked stopped', async () => {
    const r = open(() => [{ text: 'Half' }, { waitForCancel: { ms: 10_000 } }]);
    const sent = r.controller.receive({ type: 'send', text: 'Long answer please', images: [] });
    await within(5000, 'the first delta', (async () => {
      while (!r.types().includes('delta')) {
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    })());
    await r.controller.receive({ type: 'stop' });
    await within(5000, 'the stopped turn', sent);
    assert.deepEqual(r.last('turnEnd'), { type: 'turnEnd', chatId: 'chat-1', status: 'cancelled',
      note: 'Stopped.' });
    assert.deepEqual(r.peer.cancelled, ['chat-1']);
    r.peer.setScript(() => [{ text: 'ok' }]);
    await r.controller.receive({ type: 'send', text: 'Go on', images: [] });
    assert.deepEqual(r.peer.requests[1]?.messages, [{ role: 'user', content: 'Long answer please' },
      { role: 'assistant', content: 'Half' }, { role: 'user', content: 'Go on' }]);
  });

  test('conversations survive a reload; deleting one sends chatClose', async () => {
    const memento = new MemoryMemento();
    const first = open(() => [{ text: 'A1' }], memento);
    await first.controller.receive({ type: 'send', text: 'Q1', images: [] });
    await first.controller.receive({ type: 'newChat' });
    await first.controller.receive({ type: 'send', text: 'Q2', images: [] });
    await first.controller.flush();
    first.peer.dispose();

    const second = open(() => [], memento);
    await second.controller.receive({ type: 'ready' });
    const state = second.last('state');
    assert.deepEqual(state.chats.map((c) => c.title), ['Q2', 'Q1']);
    assert.equal(state.chat.title, 'Q2');
    assert.deepEqual(state.chat.turns[0]?.assistant.steps, [{ kind: 'text', text: 'A1' }]);

    await second.controller.receive({ type: 'deleteChat', id: 'chat-1' });
    await second.controller.flush();
    await within(2000, 'chatClose', (async () => {
      while (second.peer.closed.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    })());
    assert.deepEqual(second.peer.closed, ['chat-1']);
    assert.deepEqual(second.stored().map((c) => c.title), ['Q2']);
    assert.deepEqual(second.last('state').chats.map((c) => c.title), ['Q2']);
  });

  test('a turn stored mid-answer comes back as interrupted', () => {
    const memento = new MemoryMemento();
    memento.values.set(STORAGE_KEY, [{ id: 'c', title: 'Q', updated: 5, turns: [{
      user: { text: 'Q', images: [] }, assistant: { steps: [{ kind: 'text', text: 'par' }],
        status: 'streaming' } }] }]);
    const r = open(() => [], memento);
    assert.deepEqual(r.controller.currentChat.turns[0]?.assistant, { steps: [{ kind: 'text',
      text: 'par' }], status: 'error', note: 'Interrupted (the window reloaded).' });
  });

  test('the storage bound closes the conversations it drops', async () => {
    const r = open(() => [{ text: 'A' }], undefined, { maxChats: 2, maxBytes: 1e9 });
    for (const q of ['Q1', 'Q2', 'Q3']) {
      await r.controller.receive({ type: 'newChat' });
      await r.controller.receive({ type: 'send', text: q, images: [] });
    }
    await r.controller.flush();
    assert.deepEqual(r.stored().map((c) => c.title), ['Q3', 'Q2']);
    assert.deepEqual(r.controller.conversations.map((c) => c.title), ['Q3', 'Q2']);
    assert.deepEqual(r.last('chats').chats.map((c) => c.title), ['Q3', 'Q2']);
    await within(2000, 'chatClose', (async () => {
      while (r.peer.closed.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    })());
    assert.deepEqual(r.peer.closed, ['chat-1']);
  });

  test('code blocks go to the editor; only web links are opened; junk is ignored', async () => {
    const r = open(() => []);
    await r.controller.receive({ type: 'insert', code: 'print(1)\n' });
    await r.controller.receive({ type: 'copy', code: 'x = 2' });
    await r.controller.receive({ type: 'openLink', href: 'https://mistral.ai/' });
    await r.controller.receive({ type: 'openLink', href: 'command:workbench.action.terminal.new' });
    await r.controller.receive({ type: 'exec', command: 'rm -rf /' });
    assert.deepEqual(r.inserted, ['print(1)\n']);
    assert.deepEqual(r.copied, ['x = 2']);
    assert.deepEqual(r.opened, ['https://mistral.ai/']);
    assert.deepEqual(r.logs, [
      'chat view: refused to open command:workbench.action.terminal.new',
      'chat view: ignored a malformed message {"type":"exec","command":"rm -rf /"}',
    ]);
    assert.deepEqual(r.posted, []);
  });

  test('Ask About Selection: the context goes to the page with focus, now or when it loads', async () => {
    const r = open(() => []);
    r.controller.setView(undefined);
    const context = { file: { uri: URI, label: 'app.py' },
      selection: { uri: URI, range: RANGE, label: 'app.py:3-4' } };
    r.controller.setContext(context, true);
    assert.deepEqual(r.posted, []);
    r.controller.setView({ post: (m) => { r.posted.push(structuredClone(m)); } });
    await r.controller.receive({ type: 'ready' });
    assert.deepEqual(r.last('context'), { type: 'context', context, focus: true });
    r.controller.setContext({ file: { uri: URI, label: 'app.py' } });
    assert.deepEqual(r.last('context'), { type: 'context', focus: false,
      context: { file: { uri: URI, label: 'app.py' } } });
    const posted = r.posted.length;
    r.controller.setContext({ file: { uri: URI, label: 'app.py' } }); // the cursor moved
    assert.equal(r.posted.length, posted);
  });
});
