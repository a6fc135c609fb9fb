/**
 * ChatSession on the wire: requests, deltas in order, cancel, close, runTool, applyEdit.
 *
 * Against a scripted JSON-RPC peer (test/chatpeer.ts) while the server's chat is being built;
 * the last block runs the protocol-level claims against the real server on a tiny checkpoint
 * (and, for an edit proposal, against the real server with a scripted model).
 */

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';

import { needsConfirmation, type WorkspaceEdit } from '../src/chat/edits';
import { applyDelta, type AssistantEntry, type ToolStep } from '../src/chat/model';
import type { ChatDelta } from '../src/chat/protocol';
import { CancelSource, ChatSession, type ClientTool, type EditOutcome, type TurnRequest } from '../src/chat/session';
import { ScriptedPeer, type Script } from './chatpeer';
import { makeTiny, Session, within } from './helpers';

const URI = 'file:///work/app.py';

function turnOf(messages: string[] = ['What does app.py do?']): TurnRequest {
  return { chatId: 'chat-1', messages: messages.map((content) => ({ role: 'user', content })) };
}

const DIAGNOSTICS: ClientTool = {
  spec: { name: 'diagnostics', description: 'Problems VS Code reports',
    parameters: { type: 'object', properties: { path: { type: 'string' } } } },
  run: (args) => Promise.resolve({ content: `no problems in ${(args as { path: string }).path}`,
    isError: false }),
};

interface Harness {
  peer: ScriptedPeer;
  session: ChatSession;
  edits: WorkspaceEdit[];
  logs: string[];
}

function harness(script: Script, options: { tools?: ClientTool[]; editAnswer?: EditOutcome;
  cancelGraceMs?: number } = {}): Harness {
  const peer = new ScriptedPeer(script);
  const edits: WorkspaceEdit[] = [];
  const logs: string[] = [];
  const session = new ChatSession(peer.transport, {
    tools: options.tools ?? [],
    confirmEdit: (edit) => {
      edits.push(edit);
      return Promise.resolve(options.editAnswer ?? { applied: true });
    },
    log: (line) => { logs.push(line); },
    cancelGraceMs: options.cancelGraceMs ?? 5000,
  });
  session.attach(peer.registry);
  return { peer, session, edits, logs };
}

describe('chat session against a scripted server', () => {
  let current: Harness | undefined;
  const open = (...args: Parameters<typeof harness>): Harness => {
    current = harness(...args);
    return current;
  };
  afterEach(() => { current?.peer.dispose(); });

  test('deltas arrive in order and concatenate to the reply; params carry what was asked', async () => {
    const { peer, session } = open(() => [{ text: 'It ' }, { text: 'adds two ' },
      { text: 'numbers. é😀' }]);
    const deltas: ChatDelta[] = [];
    const request = { ...turnOf(), context: { uri: URI, range: {
      start: { line: 1, character: 0 }, end: { line: 3, character: 5 } } } };
    const outcome = await session.turn(request, (d) => deltas.push(d), new CancelSource().token);
    assert.deepEqual(deltas.map((d) => d.kind === 'text' ? d.text : d.kind),
      ['It ', 'adds two ', 'numbers. é😀']);
    assert.equal(outcome.kind, 'done');
    assert.equal(outcome.result.message.content, 'It adds two numbers. é😀');
    assert.deepEqual(outcome.result.messages,
      [{ role: 'assistant', content: 'It adds two numbers. é😀' }]);
    assert.deepEqual(outcome.result.usage, { promptTokens: 10, reusedTokens: 0, generatedTokens: 4 });
    assert.deepEqual(peer.requests, [{
      chatId: 'chat-1',
      messages: [{ role: 'user', content: 'What does app.py do?' }],
      context: request.context,
    }]);
    assert.equal(session.isRunning('chat-1'), false);
  });

  test('tool calls and results become steps in the order they arrived', async () => {
    const { session } = open(() => [
      { text: 'Let me look.' },
      { toolCall: { id: 't1', name: 'read_file', arguments: { path: 'app.py' } } },
      { toolResult: { id: 't1', content: 'def add(a, b): ...', isError: false } },
      { toolCall: { id: 't2', name: 'read_file', arguments: '{"path": ".env"}' } },
      { toolResult: { id: 't2', content: 'refused: .env is a secret file', isError: true } },
      { text: 'It adds.' },
    ]);
    const entry: AssistantEntry = { steps: [], status: 'streaming' };
    const outcome = await session.turn(turnOf(), (d) => { applyDelta(entry, d); },
      new CancelSource().token);
    assert.equal(outcome.kind, 'done');
    assert.deepEqual(entry.steps, [
      { kind: 'text', text: 'Let me look.' },
      { kind: 'tool', id: 't1', name: 'read_file', arguments: { path: 'app.py' },
        result: 'def add(a, b): ...', isError: false },
      { kind: 'tool', id: 't2', name: 'read_file', arguments: '{"path": ".env"}',
        result: 'refused: .env is a secret file', isError: true },
      { kind: 'text', text: 'It adds.' },
    ]);
  });

  test('Stop sends $/cancelRequest; the -32800 reply ends the turn cancelled; late deltas are dropped', async () => {
    const { peer, session } = open(() => [{ text: 'partial' },
      { waitForCancel: { ms: 10_000, then: [{ text: ' too late' }] } }]);
    const source = new CancelSource();
    const deltas: ChatDelta[] = [];
    const outcome = session.turn(turnOf(), (d) => {
      deltas.push(d);
      source.cancel(); // the user presses Stop as the first words appear
    }, source.token);
    assert.deepEqual(await within(5000, 'the cancelled turn', outcome), { kind: 'cancelled' });
    assert.deepEqual(peer.cancelled, ['chat-1']);
    assert.deepEqual(deltas.map((d) => d.kind === 'text' && d.text), ['partial']);
    assert.equal(session.dropped, 1);
    // The chat takes a new turn at once.
    peer.setScript(() => [{ text: 'again' }]);
    const next = await session.turn(turnOf(), () => undefined, new CancelSource().token);
    assert.equal(next.kind === 'done' && next.result.message.content, 'again');
  });

  test('a server that never answers the cancel: the turn ends after the grace period', async () => {
    const { session, logs } = open(() => [{ sleep: 1500 }], { cancelGraceMs: 50 });
    const source = new CancelSource();
    const outcome = session.turn(turnOf(), () => undefined, source.token);
    setTimeout(() => { source.cancel(); }, 20);
    assert.deepEqual(await within(1000, 'the abandoned turn', outcome), { kind: 'cancelled' });
    assert.deepEqual(logs, ['chat chat-1: no reply to the cancel; the turn ends here']);
  });

  test('an error reply (a model without vision given an image) fails the turn with its message', async () => {
    const { session } = open(() => [{ error: { code: -32602,
      message: 'This model has no vision encoder: it cannot read images.' } }]);
    const outcome = await session.turn(turnOf(), () => undefined, new CancelSource().token);
    assert.deepEqual(outcome, { kind: 'failed', code: -32602,
      message: 'This model has no vision encoder: it cannot read images.' });
  });

  test('a reply that is not a chat result fails the turn readably', async () => {
    const { session } = open(() => [{ result: { chatId: 'chat-1' } }]);
    const outcome = await session.turn(turnOf(), () => undefined, new CancelSource().token);
    assert.deepEqual(outcome, { kind: 'failed',
      message: 'malformed tramontane/chat result: {"chatId":"chat-1"}' });
  });

  test('one turn at a time per chat; no server, no turn', async () => {
    const { session } = open(() => [{ sleep: 100 }, { text: 'done' }]);
    const first = session.turn(turnOf(), () => undefined, new CancelSource().token);
    assert.deepEqual(await session.turn(turnOf(), () => undefined, new CancelSource().token),
      { kind: 'failed', message: 'This chat is already answering.' });
    assert.equal((await first).kind, 'done');
    session.setTransport(undefined);
    assert.deepEqual(await session.turn(turnOf(), () => undefined, new CancelSource().token),
      { kind: 'failed', message: 'The Tramontane server is not running.' });
  });

  test('chatClose carries the chat id', async () => {
    const { peer, session } = open(() => []);
    await session.close('chat-1');
    await within(2000, 'chatClose', (async () => {
      while (peer.closed.length === 0) {
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
    })());
    assert.deepEqual(peer.closed, ['chat-1']);
  });

  test('runTool: client tools are offered, run with the server\'s arguments, errors are tool errors', async () => {
    const failing: ClientTool = { spec: { name: 'explode', description: 'fails', parameters: {} },
      run: () => Promise.reject(new Error('boom')) };
    const { peer, session } = open(() => [
      { runTool: { id: 'c1', name: 'diagnostics', arguments: { path: 'app.py' } } },
      { runTool: { id: 'c2', name: 'nope', arguments: {} } },
      { runTool: { id: 'c3', name: 'explode', arguments: {} } },
      { text: 'ok' },
    ], { tools: [DIAGNOSTICS, failing] });
    const outcome = await session.turn(turnOf(), () => undefined, new CancelSource().token);
    assert.equal(outcome.kind, 'done');
    assert.deepEqual(peer.requests[0]?.clientTools, [DIAGNOSTICS.spec, failing.spec]);
    assert.deepEqual(peer.toolAnswers, [
      { content: 'no problems in app.py', isError: false },
      { content: 'unknown client tool: nope', isError: true },
      { content: 'explode failed: boom', isError: true },
    ]);
  });

  test('applyEdit: the edit reaches the user needing confirmation, and their answer is the reply', async () => {
    const edit = { changes: { [URI]: [{ range: { start: { line: 0, character: 0 },
      end: { line: 0, character: 3 } }, newText: 'async def' }] } };
    const { peer, session, edits } = open(() => [
      { toolCall: { id: 'e1', name: 'propose_edit', arguments: { path: 'app.py' } } },
      { applyEdit: { label: 'Make add async', edit } },
      { toolResult: { id: 'e1', content: 'the user rejected the edit', isError: true } },
    ], { editAnswer: { applied: false } });
    const outcome = await session.turn(turnOf(), () => undefined, new CancelSource().token);
    assert.equal(outcome.kind, 'done');
    assert.deepEqual(peer.editAnswers, [{ applied: false }]);
    assert.equal(edits.length, 1);
    assert.equal(needsConfirmation(edit), false);
    assert.equal(needsConfirmation(edits[0] ?? {}), true);
    assert.deepEqual(edits[0], {
      documentChanges: [{ textDocument: { uri: URI, version: null }, edits: [{
        range: edit.changes[URI][0]?.range, newText: 'async def',
        annotationId: 'tramontane.proposedEdit' }] }],
      changeAnnotations: { 'tramontane.proposedEdit': { label: 'Make add async',
        needsConfirmation: true, description: 'proposed in the chat' } },
    });
  });

  test('malformed requests from the server get a clear answer, not a hang', async () => {
    const { session } = open(() => []);
    assert.deepEqual(await session.handleApplyEdit({ edit: null }),
      { applied: false, failureReason: 'malformed workspace/applyEdit params' });
    assert.deepEqual(await session.handleRunTool({ id: 1 }, new CancelSource().token),
      { content: 'malformed tramontane/runTool params', isError: true });
    session.handleDelta({ chatId: 'chat-1', kind: 'text' });
    assert.equal(session.dropped, 1);
  });
});

// The same claims against the real server, once it speaks the chat protocol.
describe('chat session against the real server', () => {
  let tiny: { dir: string; remove: () => void } | undefined;
  let server: Session | undefined;
  let session: ChatSession;

  after(async () => {
    await server?.close();
    tiny?.remove();
  });

  test('a turn streams deltas that concatenate to the reply; Stop cancels; close is accepted', async () => {
    tiny = makeTiny();
    server = await Session.start({ model: tiny.dir, compile: false, completion: {}, cache: {},
      chat: { maxTokens: 256 }, backend: {} });
    await server.waitForStatus((s) => s.state === 'ready');
    const connection = server.connection;
    session = new ChatSession({
      sendRequest: (method, params, token) => connection.sendRequest(method, params, token),
      sendNotification: (method, params) => connection.sendNotification(method, params),
    }, { confirmEdit: () => Promise.resolve({ applied: false }) });
    session.attach({
      onNotification: (method, handler) => connection.onNotification(method, handler),
      onRequest: (method, handler) => connection.onRequest(method,
        (params: unknown, token: Parameters<typeof handler>[1]) => handler(params, token)),
    });
    let text = '';
    const outcome = await session.turn(turnOf(['Say something.']), (d) => {
      if (d.kind === 'text') { text += d.text; }
    }, new CancelSource().token);
    assert.equal(outcome.kind, 'done');
    assert.equal(outcome.result.message.content, text);

    // Stop at the first delta (or after 50 ms, should the tiny model be slow to write one).
    const source = new CancelSource();
    const stopped = session.turn({ ...turnOf(['Say more.']), chatId: 'chat-2' },
      () => { source.cancel(); }, source.token);
    setTimeout(() => { source.cancel(); }, 50);
    assert.equal((await within(30_000, 'the cancelled turn', stopped)).kind, 'cancelled');
    await session.close('chat-1');
  });

  test('a proposed edit reaches the editor as an edit needing confirmation, and the model reads the verdict', async () => {
    // The real server with a scripted model (its turns encoded and decoded by mistral-common
    // and the server's own tool-call decoder) that proposes an edit, then answers.
    const folder = mkdtempSync(join(tmpdir(), 'tramontane-chat-'));
    writeFileSync(join(folder, 'app.py'), 'x = 1\n');
    const script = join(folder, 'script.json');
    writeFileSync(script, JSON.stringify([
      { calls: [{ name: 'propose_edit', arguments: { path: 'app.py', edits: [{
        range: { start: { line: 0, character: 4 }, end: { line: 0, character: 5 } }, newText: '2' }] } }] },
      { text: 'Done.' }]));
    const scripted = await Session.start({ compile: false, completion: {}, cache: {}, chat: {}, backend: {} },
      { env: { FAKE_CHAT_FILE: script }, rootUri: pathToFileURL(folder).href });
    try {
      await scripted.waitForStatus((s) => s.state === 'ready');
      const connection = scripted.connection;
      const confirmed: WorkspaceEdit[] = [];
      const chat = new ChatSession({
        sendRequest: (method, params, token) => connection.sendRequest(method, params, token),
        sendNotification: (method, params) => connection.sendNotification(method, params),
      }, { confirmEdit: (edit) => { confirmed.push(edit); return Promise.resolve({ applied: true }); } });
      chat.attach({
        onNotification: (method, handler) => connection.onNotification(method, handler),
        onRequest: (method, handler) => connection.onRequest(method,
          (params: unknown, token: Parameters<typeof handler>[1]) => handler(params, token)),
      });
      const entry: AssistantEntry = { steps: [], status: 'streaming' };
      const outcome = await chat.turn({ chatId: 'edit', messages: [{ role: 'user', content: 'Make it 2.' }] },
        (d: ChatDelta) => { applyDelta(entry, d); }, new CancelSource().token);
      assert.equal(outcome.kind, 'done');
      assert.equal(confirmed.length, 1);
      const [edit] = confirmed;
      assert.ok(edit !== undefined && needsConfirmation(edit));
      const tool = entry.steps.find((step): step is ToolStep => step.kind === 'tool');
      assert.equal(tool?.result, 'the user reviewed and applied the 1 edit to app.py');
      assert.equal(readFileSync(join(folder, 'app.py'), 'utf8'), 'x = 1\n'); // the server writes nothing
    } finally {
      await scripted.close();
      rmSync(folder, { recursive: true, force: true });
    }
  });
});
