/** package.json against the code: commands, entry point, engine versions. */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';

import { PACKAGE_ROOT, packageJson } from './helpers';

interface Manifest {
  main: string;
  engines: { vscode: string };
  activationEvents: string[];
  contributes: { commands: { command: string }[] };
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
