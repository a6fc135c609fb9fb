/**
 * The message interface between the chat webview page and the extension (`postMessage` both
 * ways). The page is a renderer: it holds the draft and draws what the extension sends; the
 * extension holds the conversations and talks to the server.
 *
 * Everything the page posts is read with `parseFromView`: the page renders a model's output,
 * so the extension treats its messages as untrusted input (a link to open is checked again).
 */

import type { ChatContext, ChatDelta, Range } from './protocol';
import type { Conversation, ContextRef, Turn, TurnStatus } from './model';

export interface ChatSummary {
  id: string;
  title: string;
  updated: number;
}

/** The editor context the page can attach: the active file and, when there is one, the
 * selection in it. */
export interface EditorContext {
  file?: ContextRef;
  selection?: ContextRef & { range: Range };
}

export interface ImageAttachment {
  name: string;
  /** A `data:image/...;base64,...` URI. */
  url: string;
}

export type ToView =
  /** Everything: on load, after New chat, after opening another conversation. */
  | { type: 'state'; chat: Conversation; chats: ChatSummary[]; maxImageBytes: number }
  | { type: 'turnStart'; chatId: string; turn: Turn }
  | { type: 'delta'; chatId: string; delta: ChatDelta }
  | { type: 'turnEnd'; chatId: string; status: TurnStatus; note?: string }
  /** Nothing was sent, or the server refused the turn: the draft is restored, and a turn
   * already shown is taken back (`withdrawn`). */
  | { type: 'turnFailed'; chatId: string; message: string; text: string; images: ImageAttachment[];
    withdrawn: boolean }
  | { type: 'context'; context: EditorContext; focus: boolean }
  | { type: 'notice'; message: string }
  | { type: 'chats'; chats: ChatSummary[] };

export type FromView =
  | { type: 'ready' }
  | { type: 'send'; text: string; images: ImageAttachment[]; context?: ChatContext & { label: string } }
  | { type: 'stop' }
  | { type: 'newChat' }
  | { type: 'openChat'; id: string }
  | { type: 'deleteChat'; id: string }
  | { type: 'insert'; code: string }
  | { type: 'copy'; code: string }
  | { type: 'openLink'; href: string };

function record(value: unknown): Record<string, unknown> | undefined {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
    ? value as Record<string, unknown>
    : undefined;
}

function isPosition(value: unknown): boolean {
  const p = record(value);
  return p !== undefined && Number.isInteger(p.line) && Number.isInteger(p.character) &&
    (p.line as number) >= 0 && (p.character as number) >= 0;
}

function isRange(value: unknown): value is Range {
  const r = record(value);
  return r !== undefined && isPosition(r.start) && isPosition(r.end);
}

function images(value: unknown): ImageAttachment[] | undefined {
  if (!Array.isArray(value)) {
    return undefined;
  }
  const out: ImageAttachment[] = [];
  for (const item of value) {
    const raw = record(item);
    if (raw === undefined || typeof raw.name !== 'string' || typeof raw.url !== 'string') {
      return undefined;
    }
    out.push({ name: raw.name, url: raw.url });
  }
  return out;
}

function context(value: unknown): (ChatContext & { label: string }) | undefined | null {
  if (value === undefined) {
    return undefined;
  }
  const raw = record(value);
  if (raw === undefined || typeof raw.uri !== 'string' || typeof raw.label !== 'string' ||
    (raw.range !== undefined && !isRange(raw.range))) {
    return null;
  }
  return raw.range === undefined
    ? { uri: raw.uri, label: raw.label }
    : { uri: raw.uri, range: raw.range, label: raw.label };
}

/** A message from the page, or undefined when it is not one this side knows. */
export function parseFromView(value: unknown): FromView | undefined {
  const raw = record(value);
  switch (raw?.type) {
    case 'ready':
    case 'stop':
    case 'newChat':
      return { type: raw.type };
    case 'openChat':
    case 'deleteChat':
      return typeof raw.id === 'string' ? { type: raw.type, id: raw.id } : undefined;
    case 'insert':
    case 'copy':
      return typeof raw.code === 'string' ? { type: raw.type, code: raw.code } : undefined;
    case 'openLink':
      return typeof raw.href === 'string' ? { type: 'openLink', href: raw.href } : undefined;
    case 'send': {
      const attached = images(raw.images);
      const ctx = context(raw.context);
      if (typeof raw.text !== 'string' || attached === undefined || ctx === null) {
        return undefined;
      }
      return ctx === undefined
        ? { type: 'send', text: raw.text, images: attached }
        : { type: 'send', text: raw.text, images: attached, context: ctx };
    }
    default:
      return undefined;
  }
}

/** Links the page may ask to open: web pages and mail, nothing that runs in the editor
 * (`command:`, `vscode:`, `file:`, `javascript:` ...). */
export function isSafeLink(href: string): boolean {
  return /^(https?:\/\/|mailto:)/i.test(href.trim());
}
