/**
 * Forwarding one inline completion request (ghost text) to the server.
 *
 * The extension's InlineCompletionItemProvider calls `InlineForwarder.provide` with VS Code's
 * cancellation token; this checks `tramontane.enable` first (a language that is off costs no
 * request), sends `textDocument/inlineCompletion` with the token (the client library turns a
 * cancellation into `$/cancelRequest`, and the server stops generating within one step), and
 * reads the reply. Cancelled or superseded requests give `null`, which VS Code treats as
 * "nothing to show". The transport is any `RequestSender`: vscode-languageclient's client in
 * the editor, a vscode-jsonrpc connection in the tests.
 */

export const INLINE_METHOD = 'textDocument/inlineCompletion';

/** JSON-RPC / LSP error codes that mean "no longer wanted", not "broken". */
export const REQUEST_CANCELLED = -32800;
export const CONTENT_MODIFIED = -32801;
export const SERVER_CANCELLED = -32802;
const NOT_WANTED: readonly number[] = [REQUEST_CANCELLED, CONTENT_MODIFIED, SERVER_CANCELLED];

export interface Cancellable {
  readonly isCancellationRequested: boolean;
}

export interface RequestSender<T extends Cancellable> {
  sendRequest(method: string, params: unknown, token?: T): Promise<unknown>;
}

export interface Position {
  line: number;
  character: number;
}

export interface Range {
  start: Position;
  end: Position;
}

/** LSP's InlineCompletionTriggerKind: 1 invoked (by a command), 2 automatic (typing). */
export type TriggerKind = 1 | 2;

export interface InlineCompletionParams {
  textDocument: { uri: string };
  position: Position;
  context: { triggerKind: TriggerKind; selectedCompletionInfo?: { range: Range; text: string } };
}

export interface InlineItem {
  /** Plain text, or a snippet (LSP StringValue). */
  insertText: string | { kind: 'snippet'; value: string };
  filterText?: string;
  range?: Range;
}

export interface InlineRequest {
  uri: string;
  languageId: string;
  position: Position;
  triggerKind: TriggerKind;
  selectedCompletionInfo?: { range: Range; text: string };
}

/** VS Code numbers its trigger kinds from 0 (Invoke 0, Automatic 1); LSP from 1. */
export function lspTriggerKind(vscodeKind: number): TriggerKind {
  return vscodeKind === 0 ? 1 : 2;
}

export function inlineParams(request: InlineRequest): InlineCompletionParams {
  const context: InlineCompletionParams['context'] = { triggerKind: request.triggerKind };
  if (request.selectedCompletionInfo !== undefined) {
    context.selectedCompletionInfo = request.selectedCompletionInfo;
  }
  return { textDocument: { uri: request.uri }, position: request.position, context };
}

function isPosition(value: unknown): value is Position {
  const p = value as Partial<Position> | null;
  return typeof p === 'object' && p !== null && Number.isInteger(p.line) &&
    Number.isInteger(p.character);
}

function isRange(value: unknown): value is Range {
  const r = value as Partial<Range> | null;
  return typeof r === 'object' && r !== null && isPosition(r.start) && isPosition(r.end);
}

function inlineItem(value: unknown): InlineItem | undefined {
  if (value === null || typeof value !== 'object') {
    return undefined;
  }
  const raw = value as Record<string, unknown>;
  const text = raw.insertText;
  let insertText: InlineItem['insertText'];
  if (typeof text === 'string') {
    insertText = text;
  } else if (typeof text === 'object' && text !== null &&
    (text as Record<string, unknown>).kind === 'snippet' &&
    typeof (text as Record<string, unknown>).value === 'string') {
    insertText = { kind: 'snippet', value: (text as { value: string }).value };
  } else {
    return undefined;
  }
  const item: InlineItem = { insertText };
  if (typeof raw.filterText === 'string') {
    item.filterText = raw.filterText;
  }
  if (isRange(raw.range)) {
    item.range = raw.range;
  }
  return item;
}

/** The items of an inline completion reply (`InlineCompletionList`, an item array or null);
 * malformed items are dropped. */
export function inlineItems(result: unknown): InlineItem[] {
  const list = Array.isArray(result)
    ? result
    : result !== null && typeof result === 'object' &&
        Array.isArray((result as { items?: unknown }).items)
      ? (result as { items: unknown[] }).items
      : [];
  return list.map(inlineItem).filter((item): item is InlineItem => item !== undefined);
}

/** The error code of a JSON-RPC error reply (vscode-jsonrpc's ResponseError), if it is one. */
export function errorCode(error: unknown): number | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'number' ? code : undefined;
}

export interface ForwarderHooks {
  /** Whether completions are on for a language (`tramontane.enable`). */
  isEnabled(languageId: string): boolean;
  /** A request that failed for another reason than cancellation. */
  onError?(error: unknown): void;
}

export class InlineForwarder<T extends Cancellable> {
  /** Requests actually sent to the server (not those skipped or already cancelled). */
  sent = 0;

  constructor(
    private readonly rpc: RequestSender<T>,
    private readonly hooks: ForwarderHooks,
  ) {}

  /** The items to show, or null when nothing was asked (off here, or already cancelled) or
   * the request was cancelled or failed. */
  async provide(request: InlineRequest, token: T): Promise<InlineItem[] | null> {
    // A function, not the property: the token changes under us while the request runs.
    const cancelled = (): boolean => token.isCancellationRequested;
    if (!this.hooks.isEnabled(request.languageId) || cancelled()) {
      return null;
    }
    this.sent += 1;
    let result: unknown;
    try {
      result = await this.rpc.sendRequest(INLINE_METHOD, inlineParams(request), token);
    } catch (error) {
      const code = errorCode(error);
      if (cancelled() || (code !== undefined && NOT_WANTED.includes(code))) {
        return null;
      }
      this.hooks.onError?.(error);
      return null;
    }
    return cancelled() ? null : inlineItems(result);
  }
}
