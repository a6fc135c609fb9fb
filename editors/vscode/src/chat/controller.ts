/**
 * The extension side of the chat view: it holds the conversations, turns the page's messages
 * into turns on the server (through ChatSession), forwards each delta to the page as it
 * arrives, and stores the conversations after each change.
 *
 * The page may be gone (a hidden view is destroyed) while a turn streams: the turn goes on
 * here, and the page gets the whole conversation again when it comes back (`ready`). One turn
 * at a time per conversation; other conversations may stream meanwhile.
 */

import { dataUriProblem } from './images';
import {
  type ChatSummary,
  type EditorContext,
  type FromView,
  isSafeLink,
  parseFromView,
  type ToView,
} from './messages';
import {
  answerText,
  applyDelta,
  type Conversation,
  finishNote,
  history,
  titleOf,
  type Turn,
  type UserEntry,
  userMessage,
} from './model';
import { CancelSource, type ChatSession } from './session';
import type { ChatStore } from './store';

export interface ChatHost {
  /** `tramontane.chat.maxImageMiB`, in bytes. */
  maxImageBytes(): number;
  insert(code: string): Promise<void>;
  copy(code: string): Promise<void>;
  openLink(href: string): Promise<void>;
  log(line: string): void;
  now(): number;
  newId(): string;
}

export interface ViewPort {
  post(message: ToView): void;
}

export class ChatController {
  private chats: Conversation[];
  private current: Conversation;
  private view: ViewPort | undefined;
  private context: EditorContext = {};
  private focusPending = false;
  private readonly running = new Map<string, CancelSource>();
  private saving: Promise<void> = Promise.resolve();

  constructor(
    private readonly session: ChatSession,
    private readonly store: ChatStore,
    private readonly host: ChatHost,
  ) {
    this.chats = store.load();
    for (const chat of this.chats) {
      for (const turn of chat.turns) {
        if (turn.assistant.status === 'streaming') {
          // Stored mid-answer, then the window reloaded: that turn is over.
          turn.assistant.status = 'error';
          turn.assistant.note = 'Interrupted (the window reloaded).';
        }
      }
    }
    this.current = this.chats.reduce<Conversation | undefined>((newest, chat) =>
      newest === undefined || chat.updated > newest.updated ? chat : newest, undefined) ??
      this.fresh();
  }

  get conversations(): readonly Conversation[] {
    return this.chats;
  }

  get currentChat(): Conversation {
    return this.current;
  }

  /** The page, once it is shown (undefined while hidden). */
  setView(view: ViewPort | undefined): void {
    this.view = view;
  }

  /** The active file and selection; `focus` puts the cursor in the input (Ask About
   * Selection), now or when the page next loads. */
  setContext(context: EditorContext, focus = false): void {
    // Selection events come with every cursor move: only a change is posted.
    if (!focus && JSON.stringify(context) === JSON.stringify(this.context)) {
      return;
    }
    this.context = context;
    this.focusPending ||= focus;
    this.postContext();
  }

  newChat(): void {
    if (this.current.turns.length > 0) {
      this.current = this.fresh();
    }
    this.postState();
  }

  /** A message from the page (untrusted: anything unknown is logged and ignored). */
  async receive(raw: unknown): Promise<void> {
    const message = parseFromView(raw);
    if (message === undefined) {
      this.host.log(`chat view: ignored a malformed message ${JSON.stringify(raw).slice(0, 200)}`);
      return;
    }
    await this.handle(message);
  }

  /** Resolves when what was saved so far is written. */
  flush(): Promise<void> {
    return this.saving;
  }

  private async handle(message: FromView): Promise<void> {
    switch (message.type) {
      case 'ready':
        this.postState();
        this.postContext();
        return;
      case 'send':
        await this.send(message.text, message.images, message.context);
        return;
      case 'stop':
        this.running.get(this.current.id)?.cancel();
        return;
      case 'newChat':
        this.newChat();
        return;
      case 'openChat': {
        const chat = this.chats.find((c) => c.id === message.id);
        if (chat !== undefined) {
          this.current = chat;
          this.postState();
        }
        return;
      }
      case 'deleteChat':
        await this.delete(message.id);
        return;
      case 'insert':
        await this.host.insert(message.code);
        return;
      case 'copy':
        await this.host.copy(message.code);
        return;
      case 'openLink':
        if (isSafeLink(message.href)) {
          await this.host.openLink(message.href);
        } else {
          this.host.log(`chat view: refused to open ${message.href}`);
        }
        return;
    }
  }

  private async send(text: string, images: { name: string; url: string }[],
    context: Extract<FromView, { type: 'send' }>['context']): Promise<void> {
    const chat = this.current;
    const refuse = (why: string): void => {
      this.post({ type: 'turnFailed', chatId: chat.id, message: why, text, images,
        withdrawn: false });
    };
    if (this.running.has(chat.id)) {
      refuse('Tramontane is still answering: wait, or press Stop.');
      return;
    }
    if (text.trim() === '' && images.length === 0) {
      return;
    }
    const max = this.host.maxImageBytes();
    const problem = images.map((image) => dataUriProblem(image.name, image.url, max))
      .find((p) => p !== undefined);
    if (problem !== undefined) {
      refuse(`Nothing was sent: ${problem}`);
      return;
    }
    const user: UserEntry = { text, images: images.map((image) => image.url) };
    if (context !== undefined) {
      user.context = context.range === undefined
        ? { uri: context.uri, label: context.label }
        : { uri: context.uri, range: context.range, label: context.label };
    }
    const turn: Turn = { user, assistant: { steps: [], status: 'streaming' } };
    const messages = [...history(chat.turns), userMessage(user)];
    if (chat.turns.length === 0) {
      chat.title = titleOf(user);
      this.chats.push(chat);
    }
    chat.turns.push(turn);
    chat.updated = this.host.now();
    this.post({ type: 'turnStart', chatId: chat.id, turn });
    this.post({ type: 'chats', chats: this.summaries() });
    this.save();

    const source = new CancelSource();
    this.running.set(chat.id, source);
    const outcome = await this.session.turn(
      context === undefined
        ? { chatId: chat.id, messages }
        : { chatId: chat.id, messages,
          context: context.range === undefined
            ? { uri: context.uri }
            : { uri: context.uri, range: context.range } },
      (delta) => {
        applyDelta(turn.assistant, delta);
        this.postFor(chat, { type: 'delta', chatId: chat.id, delta });
      },
      source.token,
    );
    this.running.delete(chat.id);
    const assistant = turn.assistant;
    switch (outcome.kind) {
      case 'done': {
        const { result } = outcome;
        turn.messages = result.messages;
        if (result.userMessage !== undefined) {
          turn.sent = result.userMessage;
        }
        if (answerText(assistant) === '' && result.message.content !== '') {
          // A server that did not stream: the reply's text is the answer.
          assistant.steps.push({ kind: 'text', text: result.message.content });
          this.postFor(chat, { type: 'delta', chatId: chat.id,
            delta: { chatId: chat.id, kind: 'text', text: result.message.content } });
        }
        assistant.status = result.finishReason;
        const note = finishNote(result.finishReason);
        if (note !== undefined) {
          assistant.note = note;
        }
        break;
      }
      case 'cancelled':
        assistant.status = 'cancelled';
        assistant.note = 'Stopped.';
        break;
      case 'failed': {
        // Nothing happened on the server: the turn is taken back and the draft restored.
        chat.turns.splice(chat.turns.indexOf(turn), 1);
        if (chat.turns.length === 0) {
          this.chats = this.chats.filter((c) => c !== chat);
        }
        this.postFor(chat, { type: 'turnFailed', chatId: chat.id,
          message: `Not sent: ${outcome.message}`, text, images, withdrawn: true });
        this.post({ type: 'chats', chats: this.summaries() });
        this.save();
        return;
      }
    }
    chat.updated = this.host.now();
    const end: ToView = assistant.note === undefined
      ? { type: 'turnEnd', chatId: chat.id, status: assistant.status }
      : { type: 'turnEnd', chatId: chat.id, status: assistant.status, note: assistant.note };
    this.postFor(chat, end);
    this.save();
  }

  private async delete(id: string): Promise<void> {
    this.running.get(id)?.cancel();
    const existed = this.chats.some((c) => c.id === id);
    this.chats = this.chats.filter((c) => c.id !== id);
    if (this.current.id === id) {
      this.current = this.fresh();
    }
    if (existed) {
      await this.session.close(id);
    }
    this.postState();
    this.save();
  }

  private fresh(): Conversation {
    return { id: this.host.newId(), title: 'New chat', updated: this.host.now(), turns: [] };
  }

  private summaries(): ChatSummary[] {
    return [...this.chats].sort((a, b) => b.updated - a.updated)
      .map(({ id, title, updated }) => ({ id, title, updated }));
  }

  private save(): void {
    this.saving = this.saving.then(async () => {
      const { kept, evicted } = await this.store.save(this.chats, this.current.id);
      if (evicted.length === 0) {
        return;
      }
      this.chats = kept;
      for (const id of evicted) {
        this.running.get(id)?.cancel();
        await this.session.close(id);
      }
      this.post({ type: 'chats', chats: this.summaries() });
    }).catch((error: unknown) => {
      this.host.log(`could not store the conversations: ${String(error)}`);
    });
  }

  private post(message: ToView): void {
    this.view?.post(message);
  }

  /** Posts what concerns one conversation only while the page shows it. */
  private postFor(chat: Conversation, message: ToView): void {
    if (chat === this.current) {
      this.post(message);
    }
  }

  private postState(): void {
    this.post({ type: 'state', chat: this.current, chats: this.summaries(),
      maxImageBytes: this.host.maxImageBytes() });
  }

  private postContext(): void {
    if (this.view === undefined) {
      return;
    }
    this.post({ type: 'context', context: this.context, focus: this.focusPending });
    this.focusPending = false;
  }
}
