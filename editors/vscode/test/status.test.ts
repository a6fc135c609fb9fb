/** The status model, its status bar view, and the notices. */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { fromShowMessage, ModelNotices, serverFailed, serverNotFound, settingNamed } from '../src/core/notices';
import { parseStatus, REASON_HINTS, type Status, StatusModel, statusView } from '../src/core/status';

describe('status', () => {
  test('notifications are parsed strictly on state, leniently on the rest', () => {
    assert.deepEqual(parseStatus({ state: 'ready', message: 'm', reason: 'cancelled', extra: 1 }),
      { state: 'ready', message: 'm', reason: 'cancelled' });
    assert.deepEqual(parseStatus({ state: 'busy' }), { state: 'busy', message: '' });
    assert.deepEqual(parseStatus({ state: 'ready', message: 'm', reason: '' }),
      { state: 'ready', message: 'm' });
    assert.equal(parseStatus({ state: 'sleeping', message: 'm' }), undefined);
    assert.equal(parseStatus({ state: 'stopped', message: 'm' }), undefined);
    assert.equal(parseStatus(null), undefined);
    assert.equal(parseStatus('ready'), undefined);
  });

  test('the model tells its listeners, and ignores malformed notifications', () => {
    const model = new StatusModel();
    const seen: string[] = [];
    const subscription = model.onDidChange((s) => seen.push(s.state));
    assert.equal(model.status.state, 'starting');
    assert.equal(model.update({ state: 'loading', message: 'Loading /m' }), true);
    assert.equal(model.update({ nonsense: true }), false);
    assert.equal(model.update({ state: 'ready', message: 'ok' }), true);
    model.stopped('gone');
    subscription.dispose();
    model.starting();
    assert.deepEqual(seen, ['loading', 'ready', 'stopped']);
    assert.equal(model.status.state, 'starting');
  });

  test('the view of each state', () => {
    const view = (s: Status, off?: string): [string, string] => {
      const v = statusView(s, off);
      return [v.text, v.severity];
    };
    assert.deepEqual(view({ state: 'starting', message: '' }), ['$(loading~spin) Tramontane', 'normal']);
    assert.deepEqual(view({ state: 'loading', message: 'L' }), ['$(loading~spin) Tramontane', 'normal']);
    assert.deepEqual(view({ state: 'busy', message: 'B' }), ['$(sync~spin) Tramontane', 'normal']);
    assert.deepEqual(view({ state: 'ready', message: 'R' }), ['$(check) Tramontane', 'normal']);
    assert.deepEqual(view({ state: 'ready', message: 'R', reason: 'budget exhausted' }),
      ['$(circle-outline) Tramontane: budget exhausted', 'normal']);
    assert.deepEqual(view({ state: 'ready', message: 'R', reason: 'error' }),
      ['$(circle-outline) Tramontane: error', 'warning']);
    assert.deepEqual(view({ state: 'error', message: 'E', reason: 'no model' }),
      ['$(error) Tramontane: no model', 'error']);
    assert.deepEqual(view({ state: 'error', message: 'E' }), ['$(error) Tramontane', 'error']);
    assert.deepEqual(view({ state: 'stopped', message: 'S' }), ['$(debug-disconnect) Tramontane', 'error']);
    assert.deepEqual(view({ state: 'error', message: 'E' }, 'off for markdown'),
      ['$(circle-slash) Tramontane', 'normal']);
  });

  test('tooltips say why the last completion was empty and what to do', () => {
    const view = statusView({ state: 'ready', message: '0 tokens in 5001 ms', reason: 'budget exhausted' });
    assert.equal(view.tooltip,
      `Last completion empty: budget exhausted. ${REASON_HINTS['budget exhausted'] ?? ''}\n\n` +
      '0 tokens in 5001 ms\n\nClick for the Tramontane menu.');
    assert.equal(statusView({ state: 'ready', message: '' }, 'off for markdown').tooltip,
      'Completions are off for markdown. Click for the Tramontane menu.');
  });

  test('every reason the server gives has a hint', () => {
    // lsp_server/completions.py: NO_MODEL, CANCELLED, BUDGET, NOTHING, DISABLED, ERROR
    assert.deepEqual(Object.keys(REASON_HINTS).sort(), ['budget exhausted', 'cancelled',
      'disabled for this language', 'error', 'no model', 'nothing useful']);
  });
});

describe('notices', () => {
  test('the setting a server message is about', () => {
    assert.equal(settingNamed('Tramontane: setting completion.maxTokens = 0 is invalid'),
      'tramontane.completion.maxTokens');
    assert.equal(settingNamed("Tramontane: setting device = 'tpu' is invalid"), 'tramontane.device');
    assert.equal(settingNamed('Tramontane could not load the model: no params.json'), 'tramontane.model');
    assert.equal(settingNamed('Tramontane: edit rejected'), undefined);
  });

  test('showMessage becomes a notice of the same severity, with the setting to open', () => {
    assert.deepEqual(fromShowMessage({ type: 1, message: 'Could not load the model: x' }),
      { severity: 'error', message: 'Could not load the model: x', setting: 'tramontane.model' });
    assert.deepEqual(fromShowMessage({ type: 2, message: 'Careful' }),
      { severity: 'warning', message: 'Careful' });
    assert.deepEqual(fromShowMessage({ type: 3, message: 'model loaded' }),
      { severity: 'info', message: 'model loaded' });
    assert.deepEqual(fromShowMessage({ type: 4, message: 'log' }), { severity: 'info', message: 'log' });
    assert.equal(fromShowMessage({ type: 1 }), undefined);
    assert.equal(fromShowMessage(null), undefined);
  });

  test('a broken model is shown once; a new loading attempt starts afresh', () => {
    const notices = new ModelNotices();
    const error: Status = { state: 'error', message: 'bad', reason: 'no model' };
    assert.equal(notices.showMessage({ type: 1, message: 'could not load the model' })?.severity, 'error');
    assert.equal(notices.status(error), undefined);
    assert.equal(notices.status({ state: 'loading', message: 'Loading' }), undefined);
    assert.equal(notices.status(error)?.setting, 'tramontane.model');
    assert.equal(notices.status(error), undefined);
    assert.equal(notices.status({ state: 'busy', message: '' }), undefined);
  });

  test('server start problems open tramontane.serverCommand', () => {
    assert.deepEqual(serverNotFound('lsp_server'), {
      severity: 'error',
      message: 'Tramontane: the language server `lsp_server` was not found. Install Tramontane ' +
        '(`pip install -e .` in its checkout puts `lsp_server` in the virtual environment) and ' +
        'set `tramontane.serverCommand` to the full path of `lsp_server`.',
      setting: 'tramontane.serverCommand',
    });
    assert.equal(serverFailed('x', new Error('boom')).message,
      'Tramontane: the language server `x` could not be started: boom. Its output is in the ' +
      'Tramontane log.');
  });
});
