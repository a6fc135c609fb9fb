/**
 * The extension's core against the real server over stdio, on a tiny random checkpoint:
 * status flow, forwarding, cancellation, settings changes, and the notices a missing model or
 * server turns into.
 */

import assert from 'node:assert/strict';
import { basename, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { CancellationTokenSource, ResponseError } from 'vscode-languageserver-protocol/node';

import { findExecutable } from '../src/core/executable';
import { INLINE_METHOD, InlineForwarder, type InlineRequest, inlineItems, inlineParams } from '../src/core/inline';
import { serverNotFound } from '../src/core/notices';
import {
  configurationChange,
  declaredDefaults,
  initializationOptions,
  overlay,
  type SettingsGetter,
} from '../src/core/settings';
import { statusView } from '../src/core/status';
import { makeTiny, packageJson, SERVER, Session } from './helpers';

const HOME = '/home/me';
const URI = 'file:///work/demo.py';
// An empty line in a function body: a multi-line completion point.
const TEXT = 'def add(a, b):\n    \n\nprint(add(1, 2))\n';
const REQUEST: InlineRequest = {
  uri: URI,
  languageId: 'python',
  position: { line: 1, character: 4 },
  triggerKind: 2,
};

/** VS Code's view of the settings: package.json's defaults under the user's values. */
function userSettings(values: Record<string, unknown>): SettingsGetter {
  return overlay(values, declaredDefaults(packageJson()));
}

describe('the extension core against the real server', () => {
  let tiny: { dir: string; remove: () => void };
  let session: Session;
  let forwarder: InlineForwarder<CancellationTokenSource['token']>;
  const user: Record<string, unknown> = {};
  const completion = { maxTokens: 24, timeBudgetMs: 60_000 };
  // Compiling the decode step takes seconds even for a tiny model: the tests load it eagerly.

  before(async () => {
    tiny = makeTiny();
    Object.assign(user, { model: tiny.dir, compile: false, completion });
    session = await Session.start(initializationOptions(userSettings(user), HOME));
    forwarder = new InlineForwarder(session.connection, { isEnabled: () => true });
  });

  after(async () => {
    const code = await session.close();
    tiny.remove();
    assert.equal(code, 0);
  });

  /** Sends the settings as the extension does after a change in VS Code. */
  async function change(values: Record<string, unknown>): Promise<void> {
    await session.connection.sendNotification('workspace/didChangeConfiguration',
      configurationChange(userSettings({ ...user, ...values }), HOME));
  }

  test('status notifications take the status model from loading to ready', async () => {
    const ready = await session.waitForStatus((s) => s.state === 'ready');
    assert.deepEqual(session.statuses.slice(0, 2).map((s) => s.state), ['loading', 'ready']);
    assert.equal(session.statuses[0]?.message, `Loading ${tiny.dir}`);
    assert.match(ready.message, new RegExp(`^${basename(tiny.dir)} ready \\(`));
    assert.equal(statusView(session.status.status).text, '$(check) Tramontane');
    // package.json's defaults, sent as initializationOptions, draw no warning.
    assert.deepEqual(session.messages, []);
    assert.deepEqual(session.notices, []);
  });

  test('a forwarded inline completion equals a direct request', async () => {
    await session.open(URI, 'python', TEXT);
    const source = new CancellationTokenSource();
    const forwarded = await forwarder.provide(REQUEST, source.token);
    const direct = await session.connection.sendRequest(INLINE_METHOD, inlineParams(REQUEST));
    assert.deepEqual(forwarded, inlineItems(direct));
    assert.equal(forwarded.length, 1);
    const [item] = forwarded;
    assert.ok(item !== undefined && typeof item.insertText === 'string');
    assert.notEqual(item.insertText, '');
    assert.deepEqual(item.range, { start: REQUEST.position, end: REQUEST.position });
    assert.equal(forwarder.sent, 1);
    const last = session.statuses.at(-1);
    assert.deepEqual(last && { state: last.state, reason: last.reason }, {
      state: 'ready', reason: undefined });
  });

  test('cancelling the forwarded request stops it: null here, -32800 from the server', async () => {
    // Another document: the server answers a repeated request at the same place from the
    // completion it showed there, without waiting or computing.
    const request = { ...REQUEST, uri: 'file:///work/cancel.py' };
    await session.open(request.uri, 'python', TEXT);
    await change({ completion: { ...completion, debounceMs: 5000 } });
    const seen = session.statuses.length;
    const source = new CancellationTokenSource();
    const started = Date.now();
    const pending = forwarder.provide(request, source.token);
    setTimeout(() => { source.cancel(); }, 200);
    assert.equal(await pending, null);
    assert.ok(Date.now() - started < 4000, 'the cancel did not wait for the debounce');
    await session.waitForStatus((s) => s.reason === 'cancelled', seen);

    // The same request sent directly: the server's reply is the LSP "request cancelled" error.
    const direct = new CancellationTokenSource();
    const reply = session.connection.sendRequest(INLINE_METHOD, inlineParams(request), direct.token);
    setTimeout(() => { direct.cancel(); }, 200);
    await assert.rejects(reply, (error: unknown) =>
      error instanceof ResponseError && error.code === -32800);
    await change({});
  });

  test('a settings change arrives as didChangeConfiguration and takes effect', async () => {
    const before = await forwarder.provide(REQUEST, new CancellationTokenSource().token);
    assert.equal(before?.length, 1);

    const seen = session.statuses.length;
    await change({ completion: { ...completion, enabledLanguages: ['rust'] } });
    const items = await forwarder.provide(REQUEST, new CancellationTokenSource().token);
    assert.deepEqual(items, []);
    const status = await session.waitForStatus((s) => s.reason !== undefined, seen);
    assert.deepEqual(status.reason, 'disabled for this language');
    assert.equal(statusView(status).text, '$(circle-outline) Tramontane: disabled for this language');

    await change({});
    assert.deepEqual(await forwarder.provide(REQUEST, new CancellationTokenSource().token), before);
  });

  test('an invalid setting comes back as a warning that opens that setting', async () => {
    await change({ completion: { ...completion, maxTokens: 0 } });
    await session.waitForMessage((m) => m.type === 2);
    assert.deepEqual(session.notices, [{
      severity: 'warning',
      message: 'Tramontane: setting completion.maxTokens = 0 is invalid (expected an integer ' +
        'from 1 to 4096); keeping 24',
      setting: 'tramontane.completion.maxTokens',
    }]);
    await change({});
  });
});

describe('the notices for what is missing', () => {
  test('a model folder that does not exist: one error notice that opens tramontane.model', async () => {
    const session = await Session.start(initializationOptions(
      userSettings({ model: '/nonexistent/tramontane-model' }), HOME));
    try {
      const error = await session.waitForStatus((s) => s.state === 'error');
      assert.equal(error.reason, 'no model');
      assert.equal(statusView(error).text, '$(error) Tramontane: no model');
      const [message] = session.messages;
      assert.equal(session.messages.length, 1);
      assert.ok(message !== undefined);
      assert.equal(message.type, 1);
      assert.match(message.message, /^Tramontane could not load the model: /);
      // The server's showMessage and its status say the same thing: the user sees it once.
      assert.deepEqual(session.notices, [{
        severity: 'error',
        message: message.message,
        setting: 'tramontane.model',
      }]);
    } finally {
      assert.equal(await session.close(), 0);
    }
  });

  test('no model configured: the status alone becomes an error notice', async () => {
    const session = await Session.start(initializationOptions(userSettings({ model: '' }), HOME));
    try {
      const error = await session.waitForStatus((s) => s.state === 'error');
      assert.equal(error.reason, 'no model');
      assert.deepEqual(session.messages, []);
      const [notice] = session.notices;
      assert.equal(session.notices.length, 1);
      assert.ok(notice !== undefined);
      assert.equal(notice.severity, 'error');
      assert.equal(notice.setting, 'tramontane.model');
      assert.match(notice.message,
        /^Tramontane has no model: set `tramontane.model` .* The server said: No model configured/);
    } finally {
      assert.equal(await session.close(), 0);
    }
  });

  test('a server command that is not there is caught before starting', () => {
    assert.equal(findExecutable(SERVER), resolve(SERVER));
    assert.equal(findExecutable('tramontane-no-such-server', { PATH: '/usr/bin:/bin' }), undefined);
    assert.equal(findExecutable('sh', { PATH: '/nonexistent:/bin' }), '/bin/sh');
    assert.deepEqual(serverNotFound('tramontane-no-such-server').setting, 'tramontane.serverCommand');
  });
});
