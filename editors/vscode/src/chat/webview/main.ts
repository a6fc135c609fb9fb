/**
 * The chat page (runs in the webview; bundled to dist/chat.js). A renderer: it draws the
 * conversation the extension sends, applies the streamed deltas with the extension's own
 * `applyDelta`, and keeps the draft (text, pasted images, dismissed context chips) in the
 * webview's state, so a hidden and re-shown view still has it. Every user action is a message
 * to the extension (messages.ts); nothing here talks to the server or the editor.
 */

import { imageProblem, MIB } from '../images';
import type { ChatSummary, EditorContext, FromView, ImageAttachment, ToView } from '../messages';
import { applyDelta, type Conversation, type Turn } from '../model';
import { ago, h, iconButton, labelButton } from './dom';
import { icon, type IconName } from './icons';
import { type CodeActions, emptyState, turnView, type TurnView, updateTurn } from './turns';

interface VsCodeApi {
  postMessage(message: FromView): void;
  getState(): unknown;
  setState(state: unknown): void;
}

declare function acquireVsCodeApi(): VsCodeApi;

interface Draft {
  text: string;
  images: ImageAttachment[];
  /** The file chip's uri the user removed, and the selection chip's key. */
  dismissedFile?: string;
  dismissedSelection?: string;
}

const vscode = acquireVsCodeApi();

function post(message: FromView): void {
  vscode.postMessage(message);
}

// ---- state ---------------------------------------------------------------------------------

let chat: Conversation | undefined;
let chats: ChatSummary[] = [];
let maxImageBytes = 20 * MIB;
let editorContext: EditorContext = {};
const draft: Draft = loadDraft();

function loadDraft(): Draft {
  const saved = vscode.getState() as Partial<Draft> | undefined | null;
  const draft: Draft = {
    text: typeof saved?.text === 'string' ? saved.text : '',
    images: Array.isArray(saved?.images) ? saved.images : [],
  };
  if (typeof saved?.dismissedFile === 'string') {
    draft.dismissedFile = saved.dismissedFile;
  }
  if (typeof saved?.dismissedSelection === 'string') {
    draft.dismissedSelection = saved.dismissedSelection;
  }
  return draft;
}

function saveDraft(): void {
  draft.text = input.value;
  vscode.setState(draft);
}

function lastTurn(): Turn | undefined {
  return chat?.turns.at(-1);
}

function busy(): boolean {
  return lastTurn()?.assistant.status === 'streaming';
}

// ---- the page's frame --------------------------------------------------------------------

const app = document.getElementById('app') ?? document.body;

const titleText = h('span', 'title-text', 'New chat');
const historyButton = h('button', 'title-button', icon('history'), titleText, icon('chevron'));
historyButton.type = 'button';
historyButton.title = 'Conversations';
historyButton.setAttribute('aria-expanded', 'false');
const newButton = iconButton('plus', 'New chat');
newButton.id = 'new-chat';
const header = h('header', 'topbar', historyButton, h('div', 'spacer'), newButton);

const historyPanel = h('nav', 'history');
historyPanel.hidden = true;

const log = h('main', 'log');
log.setAttribute('aria-live', 'polite');

const noticeText = h('span', 'notice-text');
const noticeClose = iconButton('close', 'Dismiss');
const notice = h('div', 'notice', icon('error'), noticeText, noticeClose);
notice.hidden = true;
notice.setAttribute('role', 'alert');

const attachments = h('div', 'attachments');
const input = h('textarea', 'input');
input.placeholder = 'Ask about your code… (paste or drop a screenshot)';
input.rows = 1;
input.setAttribute('aria-label', 'Message');
const hint = h('span', 'hint', 'Enter to send · Shift+Enter for a new line');
const sendButton = labelButton('send', 'Send', 'primary send');
const stopButton = labelButton('stop', 'Stop', 'secondary stop');
stopButton.hidden = true;
const composer = h('footer', 'composer',
  h('div', 'composer-box', attachments, input,
    h('div', 'composer-bar', hint, h('div', 'spacer'), stopButton, sendButton)));

app.append(header, historyPanel, log, notice, composer);

// ---- notices -------------------------------------------------------------------------------

function showNotice(text: string): void {
  noticeText.textContent = text;
  notice.hidden = false;
}

function hideNotice(): void {
  notice.hidden = true;
  noticeText.textContent = '';
}

noticeClose.addEventListener('click', hideNotice);

let views: TurnView[] = [];

const codeActions: CodeActions = {
  insert: (code) => { post({ type: 'insert', code }); },
  copy: (code) => { post({ type: 'copy', code }); },
};

function nearBottom(): boolean {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
}

function scrollToEnd(): void {
  log.scrollTop = log.scrollHeight;
}

function renderConversation(): void {
  log.replaceChildren();
  views = [];
  if (chat === undefined || chat.turns.length === 0) {
    log.append(emptyState());
  } else {
    views = chat.turns.map((turn) => turnView(turn, codeActions));
    log.append(...views.map((view) => view.element));
  }
  titleText.textContent = chat?.title ?? 'New chat';
  updateBusy();
  scrollToEnd();
}

let pending: ReturnType<typeof setTimeout> | undefined;

/** Redraws the last turn at most every 30 ms, however many deltas arrived. (A timer, not
 * requestAnimationFrame, which stops while the view is hidden: the turn must be drawn when it
 * is shown again.) */
function scheduleUpdate(): void {
  if (pending !== undefined) {
    return;
  }
  pending = setTimeout(() => {
    pending = undefined;
    const view = views.at(-1);
    if (view !== undefined) {
      const follow = nearBottom();
      updateTurn(view);
      if (follow) {
        scrollToEnd();
      }
    }
  }, 30);
}

function updateBusy(): void {
  const running = busy();
  stopButton.hidden = !running;
  sendButton.hidden = running;
  app.classList.toggle('busy', running);
}

// ---- history -------------------------------------------------------------------------------

function renderHistory(): void {
  historyPanel.replaceChildren();
  if (chats.length === 0) {
    historyPanel.append(h('div', 'history-empty', 'No conversations yet.'));
    return;
  }
  for (const summary of chats) {
    const open = h('button', 'history-open', h('span', 'history-title', summary.title),
      h('span', 'history-time', ago(summary.updated)));
    open.type = 'button';
    open.addEventListener('click', () => {
      toggleHistory(false);
      post({ type: 'openChat', id: summary.id });
    });
    const remove = iconButton('trash', 'Delete conversation', 'icon-button history-delete');
    remove.addEventListener('click', () => { post({ type: 'deleteChat', id: summary.id }); });
    const item = h('div', `history-item${summary.id === chat?.id ? ' current' : ''}`, open, remove);
    item.dataset.id = summary.id;
    historyPanel.append(item);
  }
}

function toggleHistory(show = historyPanel.hidden): void {
  historyPanel.hidden = !show;
  historyButton.setAttribute('aria-expanded', String(show));
  if (show) {
    renderHistory();
  }
}

historyButton.addEventListener('click', () => { toggleHistory(); });
newButton.addEventListener('click', () => {
  toggleHistory(false);
  post({ type: 'newChat' });
});

// ---- composer: context chips, images, sending ----------------------------------------------

function selectionKey(context: EditorContext): string | undefined {
  const s = context.selection;
  return s === undefined
    ? undefined
    : `${s.uri}#${s.range.start.line}:${s.range.start.character}-${s.range.end.line}:${s.range.end.character}`;
}

function activeFile(): EditorContext['file'] {
  const file = editorContext.file;
  return file !== undefined && file.uri !== draft.dismissedFile ? file : undefined;
}

function activeSelection(): EditorContext['selection'] {
  const key = selectionKey(editorContext);
  return key !== undefined && key !== draft.dismissedSelection ? editorContext.selection : undefined;
}

function removableChip(label: string, name: IconName, title: string, onRemove: () => void,
  className: string): HTMLElement {
  const remove = iconButton('close', `Remove ${label}`, 'icon-button chip-remove');
  remove.addEventListener('click', onRemove);
  const chip = h('span', `chip ${className}`, icon(name), h('span', 'chip-label', label), remove);
  chip.title = title;
  return chip;
}

function renderAttachments(): void {
  attachments.replaceChildren();
  const file = activeFile();
  if (file !== undefined) {
    attachments.append(removableChip(file.label, 'file', file.uri, () => {
      draft.dismissedFile = file.uri;
      saveDraft();
      renderAttachments();
    }, 'file-chip'));
  }
  const selection = activeSelection();
  if (selection !== undefined) {
    attachments.append(removableChip(selection.label, 'selection', selection.uri, () => {
      const key = selectionKey(editorContext);
      if (key !== undefined) {
        draft.dismissedSelection = key;
      }
      saveDraft();
      renderAttachments();
    }, 'selection-chip'));
  }
  draft.images.forEach((image, index) => {
    const thumb = h('img', 'thumb');
    thumb.src = image.url;
    thumb.alt = image.name;
    const remove = iconButton('close', `Remove ${image.name}`, 'icon-button chip-remove image-remove');
    remove.addEventListener('click', () => {
      draft.images.splice(index, 1);
      saveDraft();
      renderAttachments();
    });
    const holder = h('span', 'image-chip', thumb, remove);
    holder.title = image.name;
    attachments.append(holder);
  });
  attachments.hidden = attachments.childElementCount === 0;
}

function readAsDataUrl(file: File): Promise<string> {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => { resolve(reader.result as string); };
    reader.onerror = () => { reject(reader.error ?? new Error('unreadable')); };
    reader.readAsDataURL(file);
  });
}

async function addImages(files: File[]): Promise<void> {
  for (const file of files) {
    const name = file.name === '' || file.name === 'image.png' ? 'pasted image' : file.name;
    const problem = imageProblem(name, file.type, file.size, maxImageBytes);
    if (problem !== undefined) {
      showNotice(problem);
      continue;
    }
    try {
      draft.images.push({ name, url: await readAsDataUrl(file) });
    } catch (error) {
      showNotice(`${name} could not be read: ${String(error)}`);
    }
  }
  saveDraft();
  renderAttachments();
}

function imageFiles(data: DataTransfer | null): File[] {
  return data === null ? [] : [...data.files].filter((file) => file.type.startsWith('image/') ||
    file.name !== '');
}

input.addEventListener('paste', (event: ClipboardEvent) => {
  const files = imageFiles(event.clipboardData).filter((f) => f.type.startsWith('image/'));
  if (files.length > 0) {
    event.preventDefault();
    void addImages(files);
  }
});

document.addEventListener('dragover', (event: DragEvent) => {
  if (event.dataTransfer?.types.includes('Files') === true) {
    event.preventDefault();
    app.classList.add('dragging');
  }
});
document.addEventListener('dragleave', () => { app.classList.remove('dragging'); });
document.addEventListener('drop', (event: DragEvent) => {
  app.classList.remove('dragging');
  const files = imageFiles(event.dataTransfer);
  if (files.length > 0) {
    event.preventDefault();
    void addImages(files);
  }
});

function autosize(): void {
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
}

function send(): void {
  if (busy()) {
    return;
  }
  const text = input.value;
  if (text.trim() === '' && draft.images.length === 0) {
    return;
  }
  hideNotice();
  const selection = activeSelection();
  const file = activeFile();
  const context = selection !== undefined
    ? { uri: selection.uri, range: selection.range, label: selection.label }
    : file !== undefined ? { uri: file.uri, label: file.label } : undefined;
  post(context === undefined
    ? { type: 'send', text, images: draft.images }
    : { type: 'send', text, images: draft.images, context });
  input.value = '';
  draft.images = [];
  saveDraft();
  renderAttachments();
  autosize();
}

input.addEventListener('input', () => {
  saveDraft();
  autosize();
});
input.addEventListener('keydown', (event: KeyboardEvent) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === 'Escape' && busy()) {
    post({ type: 'stop' });
  }
});
sendButton.addEventListener('click', send);
stopButton.addEventListener('click', () => { post({ type: 'stop' }); });

// Links in answers open through the extension, which checks them again.
log.addEventListener('click', (event: MouseEvent) => {
  const link = (event.target as Element | null)?.closest('a');
  if (link !== null && link !== undefined) {
    event.preventDefault();
    post({ type: 'openLink', href: link.getAttribute('href') ?? '' });
  }
});

// ---- messages from the extension -----------------------------------------------------------

function onMessage(message: ToView): void {
  switch (message.type) {
    case 'state':
      chat = message.chat;
      chats = message.chats;
      maxImageBytes = message.maxImageBytes;
      renderConversation();
      if (!historyPanel.hidden) {
        renderHistory();
      }
      return;
    case 'chats':
      chats = message.chats;
      titleText.textContent = chats.find((c) => c.id === chat?.id)?.title ??
        (chat === undefined || chat.turns.length === 0 ? 'New chat' : titleText.textContent);
      if (!historyPanel.hidden) {
        renderHistory();
      }
      return;
    case 'turnStart': {
      if (chat?.id !== message.chatId) {
        return;
      }
      if (chat.turns.length === 0) {
        log.replaceChildren();
      }
      chat.turns.push(message.turn);
      const view = turnView(message.turn, codeActions);
      views.push(view);
      log.append(view.element);
      updateBusy();
      scrollToEnd();
      return;
    }
    case 'delta': {
      const turn = lastTurn();
      if (chat?.id === message.chatId && turn !== undefined) {
        applyDelta(turn.assistant, message.delta);
        scheduleUpdate();
      }
      return;
    }
    case 'turnEnd': {
      const turn = lastTurn();
      const view = views.at(-1);
      if (chat?.id !== message.chatId || turn === undefined || view === undefined) {
        return;
      }
      turn.assistant.status = message.status;
      if (message.note !== undefined) {
        turn.assistant.note = message.note;
      }
      updateTurn(view);
      updateBusy();
      return;
    }
    case 'turnFailed':
      if (chat?.id === message.chatId && message.withdrawn && busy()) {
        chat.turns.pop();
        renderConversation();
      }
      if (input.value === '') {
        input.value = message.text;
        draft.images = [...message.images, ...draft.images];
        saveDraft();
        renderAttachments();
        autosize();
      }
      showNotice(message.message);
      return;
    case 'context':
      editorContext = message.context;
      renderAttachments();
      if (message.focus) {
        input.focus();
      }
      return;
    case 'notice':
      showNotice(message.message);
      return;
  }
}

window.addEventListener('message', (event: MessageEvent) => {
  onMessage(event.data as ToView);
});

input.value = draft.text;
renderAttachments();
renderConversation();
autosize();
post({ type: 'ready' });
