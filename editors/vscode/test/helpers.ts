/**
 * The real Tramontane server over stdio, driven from plain Node with vscode-jsonrpc, with the
 * extension's own core wired to it exactly as src/extension.ts wires it to VS Code.
 *
 * TRAMONTANE_LSP_SERVER and TRAMONTANE_CLI name the server and the CLI (default: the
 * repository's .venv).
 */

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import {
  createProtocolConnection,
  type ProtocolConnection,
  StreamMessageReader,
  StreamMessageWriter,
} from 'vscode-languageserver-protocol/node';

import { ModelNotices, type Notice } from '../src/core/notices';
import type { InitializationOptions } from '../src/core/settings';
import { STATUS_METHOD, type Status, StatusModel } from '../src/core/status';

/** editors/vscode (tests run from out/test/). */
export const PACKAGE_ROOT = resolve(__dirname, '..', '..');
const REPO_ROOT = resolve(PACKAGE_ROOT, '..', '..');

export const SERVER = process.env.TRAMONTANE_LSP_SERVER ?? join(REPO_ROOT, '.venv/bin/lsp_server');
export const CLI = process.env.TRAMONTANE_CLI ?? join(REPO_ROOT, '.venv/bin/tramontane');

export function packageJson(): unknown {
  return JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8'));
}

/** A tiny random-weight checkpoint (real v3 tokenizer, noise output) in a new temp folder.
 * Seed 3 gives a non-empty completion for the tests' document (as in tests/e2e). */
export function makeTiny(): { dir: string; remove: () => void } {
  const parent = mkdtempSync(join(tmpdir(), 'tramontane-vscode-'));
  const dir = join(parent, 'tiny');
  execFileSync(CLI, ['make-tiny', dir, '--seed', '3'], { stdio: ['ignore', 'ignore', 'pipe'],
    timeout: 60_000 });
  return { dir, remove: () => { rmSync(parent, { recursive: true, force: true }); } };
}

export function within<T>(ms: number, what: string, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => { reject(new Error(`timed out after ${ms} ms: ${what}`)); }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => { clearTimeout(timer); });
}

export interface ShowMessage {
  type: number;
  message: string;
}

/** One server process, one connection, and what the extension's core made of its messages. */
export class Session {
  readonly statuses: Status[] = [];
  readonly messages: ShowMessage[] = [];
  readonly notices: Notice[] = [];
  readonly status = new StatusModel();
  private readonly modelNotices = new ModelNotices();
  private stderr = '';
  private readonly waiters = new Set<() => void>();

  private constructor(readonly connection: ProtocolConnection, private readonly proc: ChildProcess) {
    proc.stderr?.on('data', (chunk: Buffer) => { this.stderr += chunk.toString(); });
    connection.onNotification(STATUS_METHOD, (params: unknown) => {
      if (this.status.update(params)) {
        this.statuses.push(this.status.status);
        this.record(this.modelNotices.status(this.status.status));
      }
      this.wake();
    });
    connection.onNotification('window/showMessage', (params: ShowMessage) => {
      this.messages.push(params);
      this.record(this.modelNotices.showMessage(params));
      this.wake();
    });
    connection.onNotification('window/logMessage', () => undefined);
    connection.listen();
  }

  /** Spawns the server, sends initialize (VS Code's relevant capabilities) and initialized. */
  /** The server on `options`; `scripted` runs the repository's scripted-model server instead
   * (tests/e2e/fake_server.py: the real server with a backend replaying `env`'s script) in a
   * workspace folder `rootUri`. */
  static async start(options: InitializationOptions,
    scripted?: { env: Record<string, string>; rootUri: string }): Promise<Session> {
    const proc = scripted === undefined
      ? spawn(SERVER, ['--stdio'], { stdio: ['pipe', 'pipe', 'pipe'] })
      : spawn(join(dirname(SERVER), 'python'), ['-m', 'tests.e2e.fake_server'],
        { stdio: ['pipe', 'pipe', 'pipe'], cwd: REPO_ROOT, env: { ...process.env, ...scripted.env } });
    const connection = createProtocolConnection(new StreamMessageReader(proc.stdout),
      new StreamMessageWriter(proc.stdin));
    const session = new Session(connection, proc);
    await within(30_000, `initialize (server stderr: ${session.stderr})`,
      connection.sendRequest('initialize', {
        processId: process.pid,
        rootUri: scripted?.rootUri ?? null,
        workspaceFolders: scripted === undefined ? null : [{ uri: scripted.rootUri, name: 'work' }],
        capabilities: {
          textDocument: {
            synchronization: { dynamicRegistration: false },
            inlineCompletion: { dynamicRegistration: false },
          },
          window: { showMessage: {} },
          workspace: { applyEdit: true },
        },
        initializationOptions: options,
      }));
    await connection.sendNotification('initialized', {});
    return session;
  }

  /** Resolves with the first status (from the start of the session or after `since`) that
   * satisfies `test`. */
  async waitForStatus(test: (s: Status) => boolean, since = 0, ms = 30_000): Promise<Status> {
    return within(ms, `a status (seen: ${JSON.stringify(this.statuses)}; stderr: ${this.stderr})`,
      this.until(() => this.statuses.slice(since).find(test)));
  }

  async waitForMessage(test: (m: ShowMessage) => boolean, ms = 30_000): Promise<ShowMessage> {
    return within(ms, `a showMessage (seen: ${JSON.stringify(this.messages)})`,
      this.until(() => this.messages.find(test)));
  }

  open(uri: string, languageId: string, text: string): Promise<void> {
    return this.connection.sendNotification('textDocument/didOpen',
      { textDocument: { uri, languageId, version: 1, text } });
  }

  /** shutdown + exit, then the process is gone (killed if it lingers). */
  async close(): Promise<number | null> {
    const exited = new Promise<number | null>((done) => {
      if (this.proc.exitCode !== null) {
        done(this.proc.exitCode);
      } else {
        this.proc.once('exit', (code) => { done(code); });
      }
    });
    try {
      await within(10_000, 'shutdown', this.connection.sendRequest('shutdown'));
      await this.connection.sendNotification('exit');
      return await within(10_000, 'the server to exit', exited);
    } finally {
      this.connection.dispose();
      if (this.proc.exitCode === null) {
        this.proc.kill('SIGKILL');
      }
    }
  }

  private record(notice: Notice | undefined): void {
    if (notice !== undefined) {
      this.notices.push(notice);
    }
  }

  private wake(): void {
    for (const waiter of this.waiters) {
      waiter();
    }
  }

  private until<T>(find: () => T | undefined): Promise<T> {
    return new Promise((done) => {
      const check = (): void => {
        const found = find();
        if (found !== undefined) {
          this.waiters.delete(check);
          done(found);
        }
      };
      this.waiters.add(check);
      check();
    });
  }
}
