/** package.json against the code: commands, entry point, engine versions. */

import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';

import { PACKAGE_ROOT, packageJson } from './helpers';

interface Manifest {
  main: string;
  engines: { vscode: string };
  activationEvents: string[];
  contributes: {
    commands: { command: string }[];
    viewsContainers: { activitybar: { id: string; icon: string }[] };
    views: Record<string, { type: string; id: string; icon: string }[]>;
    menus: Record<string, { command: string }[]>;
  };
  devDependencies: Record<string, string>;
}

const manifest = packageJson() as Manifest;

describe('manifest', () => {
  test('every contributed command is registered, and only those', () => {
    const source = readFileSync(join(PACKAGE_ROOT, 'src', 'extension.ts'), 'utf8');
    const registered = [...source.matchAll(/registerCommand\('([^']+)'/g)].map((m) => m[1]).sort();
    const contributed = manifest.contributes.commands.map((c) => c.command).sort();
    assert.deepEqual(registered, contributed);
  });

  test('the chat view: its own activity-bar container, a webview view the extension registers', () => {
    const source = readFileSync(join(PACKAGE_ROOT, 'src', 'extension.ts'), 'utf8');
    const { viewsContainers, views, menus, commands } = manifest.contributes;
    assert.deepEqual(viewsContainers.activitybar.map((c) => c.id), ['tramontane']);
    assert.deepEqual(views.tramontane?.map((v) => [v.type, v.id]), [['webview', 'tramontane.chat']]);
    assert.match(source, /const CHAT_VIEW = 'tramontane.chat';/);
    assert.match(source, /registerWebviewViewProvider\(CHAT_VIEW,/);
    for (const icon of [viewsContainers.activitybar[0]?.icon, views.tramontane[0]?.icon]) {
      assert.equal(existsSync(join(PACKAGE_ROOT, icon ?? 'missing')), true, icon);
    }
    const known = new Set(commands.map((c) => c.command));
    assert.deepEqual(Object.values(menus).flat().filter((m) => !known.has(m.command)), []);
  });

  test('the .vsix carries the chat page: its script, its stylesheet, the view icon', () => {
    const included = readFileSync(join(PACKAGE_ROOT, '.vscodeignore'), 'utf8').split('\n')
      .filter((line) => line.startsWith('!')).map((line) => line.slice(1));
    assert.deepEqual(included, ['dist/extension.js', 'dist/chat.js', 'media/chat.css',
      'media/tramontane.svg', 'package.json', 'README.md', 'LICENSE.txt']);
    const provider = readFileSync(join(PACKAGE_ROOT, 'src', 'extension.ts'), 'utf8');
    assert.match(provider, /'dist', 'chat.js'/);
    assert.match(provider, /'media', 'chat.css'/);
  });

  test('the bundle is the entry point, started once VS Code is up', () => {
    assert.equal(manifest.main, './dist/extension.js');
    assert.deepEqual(manifest.activationEvents, ['onStartupFinished']);
  });

  test('the VS Code API typed against is the oldest one the extension claims', () => {
    // vscode-languageclient 9 needs ^1.82; @types/vscode must not be newer than `engines`.
    assert.equal(manifest.engines.vscode, '^1.82.0');
    assert.equal(manifest.devDependencies['@types/vscode'], '1.82.0');
    const client = JSON.parse(readFileSync(join(PACKAGE_ROOT, 'node_modules',
      'vscode-languageclient', 'package.json'), 'utf8')) as { engines: { vscode: string } };
    assert.equal(client.engines.vscode, '^1.82.0');
  });
});
