/**
 * The chat on the wire: one `tramontane/chat` request per turn, its deltas routed to that turn
 * in arrival order, cancellation, `tramontane/chatClose`, and the two requests the server makes
 * of the editor during a turn (`tramontane/runTool` for client tools, `workspace/applyEdit` for
 * `propose_edit`, always with the user's confirmation).
 *
 * The transport is anything with vscode-jsonrpc's shape: vscode-languageclient's client in the
 * editor (re-attached after each server restart), a plain connection in the tests, where a
 * scripted peer stands in for the server; nothing here depends on which. A turn never throws:
 * it ends done, cancelled or failed, and the caller draws that.
 */

import { requireConfirmation, type WorkspaceEdit } from './edits';
import {
  CHAT_CLOSE_METHOD,
  CHAT_DELTA_METHOD,
  CHAT_METHOD,
  type ChatContext,
  type ChatDelta,
  type ChatParams,
  type ChatResult,
  type Message,
  parseDelta,
  parseResult,
  parseRunTool,
  RUN_TOOL_METHOD,
  APPLY_EDIT_METHOD,
  type RunToolResult,
  type ToolSpec,
} from './protocol';

export const REQUEST_CANCELLED = -32800;

export interface Disposable {
  dispose(): unknown;
}

/** vscode's and vscode-jsonrpc's CancellationToken, structurally. */
export interface CancelToken {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: (event: unknown) => unknown): Disposable;
}

class Token implements CancelToken {
  isCancellationRequested = false;
  readonly listeners = new Set<(event: unknown) => unknown>();

  onCancellationRequested(listener: (event: unknown) => unknown): Disposable {
    this.listeners.add(listener);
    return { dispose: () => this.listeners.delete(listener) };
  }
}

export class CancelSource {
  private readonly state = new Token();
  readonly token: CancelToken = this.state;

  cancel(): void {
    if (this.state.isCancellationRequested) {
      return;
    }
    this.state.isCancellationRequested = true;
    for (const listener of [...this.state.listeners]) {
      listener(undefined);
    }
  }
}

/** What a turn needs of the connection. */
export interface ChatTransport {
  sendRequest(method: string, params: unknown, token?: CancelToken): Promise<unknown>;
  sendNotification(method: string, params: unknown): Promise<void>;
}

/** Where the session's handlers are registered (the client, or a test connection). */
export interface HandlerRegistry {
  onNotification(method: string, handler: (params: unknown) => void): Disposable;
  onRequest(method: string, handler: (params: unknown, token: CancelToken) => unknown): Disposable;
}

/** A tool the editor runs itself when the server asks (`tramontane/runTool`). */
export interface ClientTool {
  spec: ToolSpec;
  run(args: unknown, token: CancelToken): Promise<RunToolResult>;
}

export interface EditOutcome {
  applied: boolean;
  failureReason?: string;
}

export interface SessionOptions {
  tools?: readonly ClientTool[];
  /** Shows the edit to the user (VS Code's refactor preview); resolves when they decided. */
  confirmEdit(edit: WorkspaceEdit, label?: string): Promise<EditOutcome>;
  log?(line: string): void;
  /** How long a cancelled turn waits for the server's reply before it ends anyway. */
  cancelGraceMs?: number;
}

export interface TurnRequest {
  chatId: string;
  /** The history and the new user message, last. */
  messages: Message[];
  context?: ChatContext;
}

export type TurnOutcome =
  | { kind: 'done'; result: ChatResult }
  | { kind: 'cancelled' }
  | { kind: 'failed'; message: string; code?: number };

interface ActiveTurn {
  onDelta(delta: ChatDelta): void;
  token: CancelToken;
}

function errorOf(error: unknown): { message: string; code?: number } {
  const raw = error as { message?: unknown; code?: unknown } | null;
  const message = typeof raw?.message === 'string' && raw.message !== ''
    ? raw.message
    : String(error);
  return typeof raw?.code === 'number' ? { message, code: raw.code } : { message };
}

export class ChatSession {
  private readonly turns = new Map<string, ActiveTurn>();
  private readonly tools: ReadonlyMap<string, ClientTool>;
  /** Deltas that matched no running turn (late ones after a cancel, or malformed). */
  dropped = 0;

  constructor(private transport: ChatTransport | undefined, private readonly options: SessionOptions) {
    this.tools = new Map((options.tools ?? []).map((tool) => [tool.spec.name, tool]));
  }

  /** The connection turns go to (a new one after a server restart; undefined while none). */
  setTransport(transport: ChatTransport | undefined): void {
    this.transport = transport;
  }

  /** Registers the delta, runTool and applyEdit handlers on a connection. */
  attach(registry: HandlerRegistry): Disposable[] {
    return [
      registry.onNotification(CHAT_DELTA_METHOD, (params) => { this.handleDelta(params); }),
      registry.onRequest(RUN_TOOL_METHOD, (params, token) => this.handleRunTool(params, token)),
      registry.onRequest(APPLY_EDIT_METHOD, (params) => this.handleApplyEdit(params)),
    ];
  }

  isRunning(chatId: string): boolean {
    return this.turns.has(chatId);
  }

  /** The request's params: client tools are offered when there are any. */
  params(request: TurnRequest): ChatParams {
    const params: ChatParams = { chatId: request.chatId, messages: request.messages };
    if (this.tools.size > 0) {
      params.clientTools = [...this.tools.values()].map((tool) => tool.spec);
    }
    if (request.context !== undefined) {
      params.context = request.context;
    }
    return params;
  }

  /** Runs one turn: deltas go to `onDelta` in order until the reply; `token` stops it. */
  async turn(request: TurnRequest, onDelta: (delta: ChatDelta) => void, token: CancelToken):
  Promise<TurnOutcome> {
    const transport = this.transport;
    if (transport === undefined) {
      return { kind: 'failed', message: 'The Tramontane server is not running.' };
    }
    if (this.turns.has(request.chatId)) {
      return { kind: 'failed', message: 'This chat is already answering.' };
    }
    // A function, not the property: the token changes under us while the turn runs.
    const cancelled = (): boolean => token.isCancellationRequested;
    if (cancelled()) {
      return { kind: 'cancelled' };
    }
    this.turns.set(request.chatId, { onDelta, token });
    let grace: NodeJS.Timeout | undefined;
    const abandoned = new Promise<'abandoned'>((resolve) => {
      token.onCancellationRequested(() => {
        grace = setTimeout(() => { resolve('abandoned'); }, this.options.cancelGraceMs ?? 5000);
      });
    });
    try {
      const reply = await Promise.race([
        transport.sendRequest(CHAT_METHOD, this.params(request), token),
        abandoned,
      ]);
      if (reply === 'abandoned') {
        this.options.log?.(`chat ${request.chatId}: no reply to the cancel; the turn ends here`);
        return { kind: 'cancelled' };
      }
      // A reply that raced the cancel is a finished answer: it is kept.
      const result = parseResult(reply);
      return result.finishReason === 'cancelled' ? { kind: 'cancelled' } : { kind: 'done', result };
    } catch (error) {
      const { message, code } = errorOf(error);
      if (code === REQUEST_CANCELLED || cancelled()) {
        return { kind: 'cancelled' };
      }
      this.options.log?.(`chat ${request.chatId} failed: ${message}`);
      return code === undefined ? { kind: 'failed', message } : { kind: 'failed', message, code };
    } finally {
      clearTimeout(grace);
      this.turns.delete(request.chatId);
    }
  }

  /** Tells the server a conversation is gone (it frees the chat's cache). */
  async close(chatId: string): Promise<void> {
    try {
      await this.transport?.sendNotification(CHAT_CLOSE_METHOD, { chatId });
    } catch (error) {
      // The server may be gone already: nothing then holds the chat's cache.
      this.options.log?.(`chatClose ${chatId}: ${errorOf(error).message}`);
    }
  }

  handleDelta(params: unknown): void {
    const delta = parseDelta(params);
    const turn = delta === undefined ? undefined : this.turns.get(delta.chatId);
    // After Stop, late deltas are not shown: the user asked the answer to stop.
    if (delta === undefined || turn === undefined || turn.token.isCancellationRequested) {
      this.dropped += 1;
      return;
    }
    turn.onDelta(delta);
  }

  async handleRunTool(params: unknown, token: CancelToken): Promise<RunToolResult> {
    const call = parseRunTool(params);
    if (call === undefined) {
      return { content: `malformed ${RUN_TOOL_METHOD} params`, isError: true };
    }
    const tool = this.tools.get(call.name);
    if (tool === undefined) {
      return { content: `unknown client tool: ${call.name}`, isError: true };
    }
    try {
      return await tool.run(call.arguments, token);
    } catch (error) {
      // A tool's failure is the model's business (a tool error), not the connection's.
      return { content: `${call.name} failed: ${errorOf(error).message}`, isError: true };
    }
  }

  async handleApplyEdit(params: unknown): Promise<EditOutcome> {
    const raw = params as { edit?: unknown; label?: unknown } | null;
    if (typeof raw !== 'object' || raw === null || typeof raw.edit !== 'object' ||
      raw.edit === null || Array.isArray(raw.edit)) {
      return { applied: false, failureReason: 'malformed workspace/applyEdit params' };
    }
    const label = typeof raw.label === 'string' ? raw.label : undefined;
    return this.options.confirmEdit(requireConfirmation(raw.edit, label), label);
  }
}
