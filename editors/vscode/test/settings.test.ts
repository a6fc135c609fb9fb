/** Settings mapping: package.json's flat `tramontane.*` keys -> the server's settings tree. */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  CLIENT_KEYS,
  concernsServer,
  configurationChange,
  declaredDefaults,
  initializationOptions,
  modelPath,
  needsRestart,
  overlay,
  SERVER_SETTING_KEYS,
  serverCommand,
} from '../src/core/settings';
import { packageJson } from './helpers';

const defaults = declaredDefaults(packageJson());

describe('settings', () => {
  test('package.json declares exactly the client keys and the server keys', () => {
    const pkg = packageJson() as { contributes: { configuration: { properties: object } } };
    const declared = Object.keys(pkg.contributes.configuration.properties).sort();
    const expected = [...CLIENT_KEYS, ...SERVER_SETTING_KEYS].map((k) => `tramontane.${k}`).sort();
    assert.deepEqual(declared, expected);
  });

  test('the defaults become these initializationOptions', () => {
    assert.deepEqual(initializationOptions(defaults, '/home/me'), {
      model: null,
      device: 'cpu',
      dtype: null,
      quantize: null,
      compile: true,
      adapters: {},
      completion: {
        maxTokens: 128,
        prefixTokens: 1536,
        suffixTokens: 512,
        timeBudgetMs: 5000,
        debounceMs: 0,
        temperature: 0,
        enabledLanguages: ['*'],
        adapter: null,
        lookup: 8,
      },
      cache: { enabled: true, budgetMiB: null },
      chat: {
        maxTokens: 1024,
        temperature: 0.3,
        maxToolSteps: 8,
        toolTimeoutMs: 5000,
        toolOutputChars: 20000,
        deniedPaths: [],
        maxImageMiB: 20,
      },
      backend: {
        kind: 'local',
        url: 'http://127.0.0.1:8000/v1',
        model: null,
        tokenizer: null,
        apiKeyEnv: null,
        maxRequestsPerSecond: null,
        caBundle: null,
      },
    });
  });

  test('user values override defaults and are passed through for the server to check', () => {
    const get = overlay({ model: '~/models/codestral', dtype: 'bfloat16',
      completion: { maxTokens: 'lots', enabledLanguages: ['python'] } }, defaults);
    const options = initializationOptions(get, '/home/me');
    assert.equal(options.model, '/home/me/models/codestral');
    assert.equal(options.dtype, 'bfloat16');
    assert.equal(options.completion.maxTokens, 'lots');
    assert.deepEqual(options.completion.enabledLanguages, ['python']);
    assert.equal(options.completion.prefixTokens, 1536);
  });

  test('didChangeConfiguration carries the same tree under the section name', () => {
    const get = overlay({ completion: { temperature: 0.2 } }, defaults);
    assert.deepEqual(configurationChange(get, '/h'),
      { settings: { tramontane: initializationOptions(get, '/h') } });
  });

  test('model paths: home folder, blanks and null', () => {
    assert.equal(modelPath('~', '/home/me'), '/home/me');
    assert.equal(modelPath('~/m', '/home/me/'), '/home/me/m');
    assert.equal(modelPath('  /models/x  ', '/home/me'), '/models/x');
    assert.equal(modelPath('~other/m', '/home/me'), '~other/m');
    assert.equal(modelPath('', '/home/me'), null);
    assert.equal(modelPath('   ', '/home/me'), null);
    assert.equal(modelPath(null, '/home/me'), null);
    assert.equal(modelPath(undefined, '/home/me'), null);
    assert.equal(modelPath(42, '/home/me'), 42);
  });

  test('the server command: default, --stdio added once, extra arguments kept', () => {
    assert.deepEqual(serverCommand(defaults), { command: 'lsp_server', args: ['--stdio'] });
    assert.deepEqual(serverCommand(overlay({ serverCommand: ' /venv/bin/lsp_server ',
      serverArgs: ['--log-level', 'INFO'] }, defaults)),
    { command: '/venv/bin/lsp_server', args: ['--stdio', '--log-level', 'INFO'] });
    assert.deepEqual(serverCommand(overlay({ serverCommand: '', serverArgs: ['--stdio', 7] },
      defaults)), { command: 'lsp_server', args: ['--stdio'] });
  });

  test('which changes restart the server and which are sent to it', () => {
    const changed = (keys: string[]) => (section: string): boolean =>
      keys.some((key) => key === section || key.startsWith(`${section}.`));
    assert.equal(needsRestart(changed(['tramontane.serverCommand'])), true);
    assert.equal(needsRestart(changed(['tramontane.serverArgs'])), true);
    assert.equal(needsRestart(changed(['tramontane.model'])), false);
    assert.equal(concernsServer(changed(['tramontane.model'])), true);
    assert.equal(concernsServer(changed(['tramontane.completion.maxTokens'])), true);
    assert.equal(concernsServer(changed(['tramontane.cache.budgetMiB'])), true);
    assert.equal(concernsServer(changed(['tramontane.chat.maxImageMiB'])), true);
    assert.equal(concernsServer(changed(['tramontane.backend.url'])), true);
    assert.equal(concernsServer(changed(['tramontane.enable'])), false);
  });

  test('declaredDefaults refuses a package.json without settings', () => {
    assert.throws(() => declaredDefaults({ contributes: {} }),
      { message: 'package.json declares no contributes.configuration.properties' });
  });
});
