/**
 * A conversation as the editor keeps and shows it: turns of one user entry and one assistant
 * entry. The extension applies deltas here to keep (and store) the conversation; the webview
 * applies the same deltas with the same function to draw it, so both agree on what a stream of
 * deltas means.
 *
 * The wire history (what goes back to the server with the next turn) is derived from the
 * turns: each user entry as a message, then the messages the server returned for that turn.
 * The images therefore live once, in the user entry, not twice.
 */

import type { ChatDelta, FinishReason, Message, Part, Range } from './protocol';

export interface ContextRef {
  uri: string;
  range?: Range;
  /** What the chip said, e.g. `app.py` or `app.py:12-20`. */
  label: string;
}

export interface UserEntry {
  text: string;
  /** `data:image/...;base64,...` URIs. */
  images: string[];
  context?: ContextRef;
  /** Images not kept across a reload (see store.ts). */
  droppedImages?: number;
}

export interface TextStep {
  kind: 'text';
  text: string;
}

export interface ToolStep {
  kind: 'tool';
  id: string;
  name: string;
  arguments: unknown;
  result?: string;
  isError?: boolean;
}

export type Step = TextStep | ToolStep;

/** `streaming` until the reply arrives; then the finish reason, or `error`. */
export type TurnStatus = 'streaming' | FinishReason | 'error';

export interface AssistantEntry {
  steps: Step[];
  status: TurnStatus;
  /** Shown under the answer: why it stopped, or the error. */
  note?: string;
}

export interface Turn {
  user: UserEntry;
  assistant: AssistantEntry;
  /** The server's `messages` for this turn, once it answered. */
  messages?: Message[];
  /** The user's message as the model read it (the server's `userMessage`: with the attached
   * context), sent back in place of `user` so the next prompt starts as the chat's cache
   * remembers it. */
  sent?: Message;
}

export interface Conversation {
  id: string;
  title: string;
  /** Milliseconds since the epoch of the last change. */
  updated: number;
  turns: Turn[];
}

/** Applies one delta to the assistant entry, in arrival order: text appends to the last text
 * step (or opens one after a tool step), a tool call adds a step, a result completes the step
 * with its id (a result with no call seen still shows, as its own step). */
export function applyDelta(entry: AssistantEntry, delta: ChatDelta): void {
  const last = entry.steps.at(-1);
  switch (delta.kind) {
    case 'text':
      if (last?.kind === 'text') {
        last.text += delta.text;
      } else {
        entry.steps.push({ kind: 'text', text: delta.text });
      }
      return;
    case 'toolCall':
      entry.steps.push({ kind: 'tool', id: delta.toolCall.id, name: delta.toolCall.name,
        arguments: delta.toolCall.arguments });
      return;
    case 'toolResult': {
      const { id, content, isError } = delta.toolResult;
      const step = entry.steps.find((s): s is ToolStep => s.kind === 'tool' && s.id === id &&
        s.result === undefined);
      if (step === undefined) {
        entry.steps.push({ kind: 'tool', id, name: '(unknown tool)', arguments: {},
          result: content, isError });
      } else {
        step.result = content;
        step.isError = isError;
      }
      return;
    }
  }
}

/** The answer's text so far (the text steps joined). */
export function answerText(entry: AssistantEntry): string {
  return entry.steps.filter((s): s is TextStep => s.kind === 'text').map((s) => s.text).join('');
}

/** The user's message on the wire: plain text, or parts when there are images. */
export function userMessage(user: UserEntry): Message {
  if (user.images.length === 0) {
    return { role: 'user', content: user.text };
  }
  const parts: Part[] = user.images.map((url) => ({ type: 'image_url', image_url: { url } }));
  if (user.text !== '') {
    parts.unshift({ type: 'text', text: user.text });
  }
  return { role: 'user', content: parts };
}

/** The messages to send before a new user message. A turn the server answered contributes its
 * user message as the model read it (`userMessage`, with the attached context) and the server's
 * `messages`. A stopped turn has no server messages: its partial
 * answer stands in as the assistant's message, and a turn stopped before any text is left out
 * (two user messages in a row are not a valid conversation). Failed turns are left out. */
export function history(turns: readonly Turn[]): Message[] {
  const messages: Message[] = [];
  for (const turn of turns) {
    if (turn.messages !== undefined) {
      messages.push(turn.sent ?? userMessage(turn.user), ...turn.messages);
      continue;
    }
    const partial = answerText(turn.assistant);
    if (turn.assistant.status !== 'error' && turn.assistant.status !== 'streaming' &&
      partial !== '') {
      messages.push(userMessage(turn.user), { role: 'assistant', content: partial });
    }
  }
  return messages;
}

const TITLE_CHARS = 60;

/** A conversation's title: the first line of its first message, shortened. */
export function titleOf(user: UserEntry): string {
  const line = user.text.trim().split('\n', 1)[0]?.trim() ?? '';
  if (line === '') {
    return user.images.length > 0 ? 'Image' : 'New chat';
  }
  return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line;
}

/** What the note under a finished answer says for each finish reason. */
export function finishNote(reason: FinishReason): string | undefined {
  switch (reason) {
    case 'stop':
      return undefined;
    case 'length':
      return 'Stopped at the token limit (tramontane.chat.maxTokens).';
    case 'cancelled':
      return 'Stopped.';
    case 'toolLimit':
      return 'Stopped after the most tool steps allowed (tramontane.chat.maxToolSteps).';
  }
}
