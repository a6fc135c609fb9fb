/** Request forwarding without a server: parameters, replies, the enable gate, errors. */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  INLINE_METHOD,
  InlineForwarder,
  type InlineRequest,
  inlineItems,
  inlineParams,
  lspTriggerKind,
} from '../src/core/inline';

const REQUEST: InlineRequest = {
  uri: 'file:///a.py', languageId: 'python', position: { line: 3, character: 7 }, triggerKind: 2,
};

class Token {
  isCancellationRequested = false;
}

/** Records what would go over the wire and answers with `reply`. */
function sender(reply: () => Promise<unknown>): {
  calls: [string, unknown, Token | undefined][];
  sendRequest(method: string, params: unknown, token?: Token): Promise<unknown>;
} {
  const calls: [string, unknown, Token | undefined][] = [];
  return {
    calls,
    sendRequest: (method, params, token) => {
      calls.push([method, params, token]);
      return reply();
    },
  };
}

describe('inline forwarding', () => {
  test('VS Code trigger kinds map to LSP ones', () => {
    assert.equal(lspTriggerKind(0), 1); // Invoke -> Invoked
    assert.equal(lspTriggerKind(1), 2); // Automatic -> Automatic
  });

  test('request parameters', () => {
    assert.deepEqual(inlineParams(REQUEST), {
      textDocument: { uri: 'file:///a.py' }, position: { line: 3, character: 7 },
      context: { triggerKind: 2 } });
    const range = { start: { line: 3, character: 0 }, end: { line: 3, character: 7 } };
    assert.deepEqual(inlineParams({ ...REQUEST, selectedCompletionInfo: { range, text: 'foo' } })
      .context, { triggerKind: 2, selectedCompletionInfo: { range, text: 'foo' } });
  });

  test('replies: a list, an array, null; malformed items dropped', () => {
    const range = { start: { line: 1, character: 2 }, end: { line: 1, character: 2 } };
    assert.deepEqual(inlineItems({ items: [{ insertText: 'x', range }] }), [{ insertText: 'x', range }]);
    assert.deepEqual(inlineItems([{ insertText: { kind: 'snippet', value: 'f($1)' }, filterText: 'f' }]),
      [{ insertText: { kind: 'snippet', value: 'f($1)' }, filterText: 'f' }]);
    assert.deepEqual(inlineItems(null), []);
    assert.deepEqual(inlineItems({ items: [{ insertText: 3 }, { range }, null, { insertText: 'ok',
      range: { start: 1 } }] }), [{ insertText: 'ok' }]);
  });

  test('sends the request with the caller\'s token', async () => {
    const rpc = sender(() => Promise.resolve({ items: [{ insertText: 'abc' }] }));
    const forwarder = new InlineForwarder(rpc, { isEnabled: () => true });
    const token = new Token();
    assert.deepEqual(await forwarder.provide(REQUEST, token), [{ insertText: 'abc' }]);
    assert.deepEqual(rpc.calls, [[INLINE_METHOD, inlineParams(REQUEST), token]]);
  });

  test('a language that is off, or a request already cancelled, sends nothing', async () => {
    const rpc = sender(() => Promise.resolve({ items: [] }));
    const languages: string[] = [];
    const forwarder = new InlineForwarder(rpc, {
      isEnabled: (language) => { languages.push(language); return language !== 'python'; },
    });
    assert.equal(await forwarder.provide(REQUEST, new Token()), null);
    const cancelled = new Token();
    cancelled.isCancellationRequested = true;
    assert.equal(await forwarder.provide({ ...REQUEST, languageId: 'rust' }, cancelled), null);
    assert.deepEqual(rpc.calls, []);
    assert.equal(forwarder.sent, 0);
    assert.deepEqual(languages, ['python', 'rust']);
  });

  test('cancellation errors give null quietly; other errors are reported, then null', async () => {
    const errors: unknown[] = [];
    const failing = (code: number) => new InlineForwarder(
      sender(() => Promise.reject(Object.assign(new Error(`code ${code}`), { code }))),
      { isEnabled: () => true, onError: (e) => errors.push(e) });
    for (const code of [-32800, -32801, -32802]) {
      assert.equal(await failing(code).provide(REQUEST, new Token()), null);
    }
    assert.deepEqual(errors, []);
    assert.equal(await failing(-32603).provide(REQUEST, new Token()), null);
    assert.deepEqual(errors.map((e) => (e as Error).message), ['code -32603']);
  });

  test('a reply that arrives after cancellation is dropped', async () => {
    const token = new Token();
    const forwarder = new InlineForwarder(sender(() => {
      token.isCancellationRequested = true;
      return Promise.resolve({ items: [{ insertText: 'late' }] });
    }), { isEnabled: () => true });
    assert.equal(await forwarder.provide(REQUEST, token), null);
  });
});
