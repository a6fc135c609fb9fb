/**
 * Conversations kept across window reloads, in the extension's workspace state (one key).
 *
 * Bounded, because VS Code keeps workspace state in a database it loads at start-up: at most
 * MAX_CHATS conversations, newest first, and at most MAX_STORED_BYTES of JSON in all. A
 * conversation that does not fit is stored without its images (the entry says how many were
 * dropped) and, when even that does not fit, forgotten; the open conversation is always kept.
 * Conversations dropped by the bound are returned, so the caller can close them on the server.
 */

import type { Conversation, Turn } from './model';

export const STORAGE_KEY = 'tramontane.chat.conversations';
export const MAX_CHATS = 50;
export const MAX_STORED_BYTES = 8 * 1024 * 1024;

/** vscode.Memento, structurally. */
export interface Memento {
  get(key: string): unknown;
  update(key: string, value: unknown): Thenable<void>;
}

export interface Limits {
  maxChats: number;
  maxBytes: number;
}

export interface Bounded {
  /** The conversations to keep (in memory and on disk), newest first. */
  kept: Conversation[];
  /** What is written: `kept`, with images dropped where needed. */
  stored: Conversation[];
  /** Ids dropped by the bound. */
  evicted: string[];
}

function withoutImages(chat: Conversation): Conversation {
  const turns: Turn[] = chat.turns.map((turn) => turn.user.images.length === 0 ? turn : {
    ...turn,
    user: { ...turn.user, images: [],
      droppedImages: (turn.user.droppedImages ?? 0) + turn.user.images.length },
  });
  return { ...chat, turns };
}

function size(chat: Conversation): number {
  return JSON.stringify(chat).length;
}

/** Applies the bound. `currentId` is the open conversation, kept whatever its size. */
export function bound(chats: readonly Conversation[], currentId: string | undefined,
  limits: Limits = { maxChats: MAX_CHATS, maxBytes: MAX_STORED_BYTES }): Bounded {
  const ordered = [...chats].sort((a, b) =>
    Number(b.id === currentId) - Number(a.id === currentId) || b.updated - a.updated);
  const kept: Conversation[] = [];
  const stored: Conversation[] = [];
  const evicted: string[] = [];
  let used = 0;
  for (const chat of ordered) {
    const current = chat.id === currentId;
    if (!current && kept.length >= limits.maxChats) {
      evicted.push(chat.id);
      continue;
    }
    let copy = chat;
    if (used + size(copy) > limits.maxBytes) {
      copy = withoutImages(chat);
    }
    if (!current && used + size(copy) > limits.maxBytes) {
      evicted.push(chat.id);
      continue;
    }
    used += size(copy);
    kept.push(chat);
    stored.push(copy);
  }
  return { kept, stored, evicted };
}

function isConversation(value: unknown): value is Conversation {
  const raw = value as Partial<Conversation> | null;
  return typeof raw === 'object' && raw !== null && typeof raw.id === 'string' &&
    typeof raw.title === 'string' && typeof raw.updated === 'number' && Array.isArray(raw.turns);
}

export class ChatStore {
  constructor(private readonly memento: Memento, private readonly limits?: Limits) {}

  /** What was stored, newest first; anything unreadable is skipped. */
  load(): Conversation[] {
    const raw = this.memento.get(STORAGE_KEY);
    return Array.isArray(raw) ? raw.filter(isConversation) : [];
  }

  /** Writes the conversations under the bound; returns the bound's verdict. */
  async save(chats: readonly Conversation[], currentId: string | undefined): Promise<Bounded> {
    const result = bound(chats, currentId, this.limits);
    await this.memento.update(STORAGE_KEY, result.stored);
    return result;
  }
}
