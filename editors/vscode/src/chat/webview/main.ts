/**
 * The chat page (runs in the webview; bundled to dist/chat.js). A renderer: it draws the
 * conversation the extension sends, applies the streamed deltas with the extension's own
 * `applyDelta`, and keeps the draft (text, pasted images, dismissed context chips) in the
 * webview's state, so a hidden and re-shown view still has it. Every user action is a message
 * to the extension (messages.ts); nothing here talks to the server or the editor.
 */

import { imageProblem, MIB } from '../images';
import type { ChatSummary, EditorContext, FromView, ImageAttachment, ToView } from '../messages';
import {
  applyDelta,
  type AssistantEntry,
  type Conversation,
  type Step,
  type ToolStep,
  type Turn,
  type TurnStatus,
} from '../model';
import { formatArguments } from '../protocol';
import { icon, type IconName } from './icons';
import { renderMarkdown } from './markdown';

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

// ---- small DOM helpers -------------------------------------------------------------------

type Child = Node | string | undefined | false;

function h<K extends keyof HTMLElementTagNameMap>(tag: K, className?: string,
  ...children: Child[]): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  if (className !== undefined && className !== '') {
    element.className = className;
  }
  for (const child of children) {
    if (child !== undefined && child !== false) {
      element.append(child);
    }
  }
  return element;
}

function iconButton(name: IconName, title: string, className = 'icon-button'): HTMLButtonElement {
  const button = h('button', className, icon(name));
  button.type = 'button';
  button.title = title;
  button.setAttribute('aria-label', title);
  return button;
}

function labelButton(name: IconName, label: string, className: string): HTMLButtonElement {
  const button = h('button', className, icon(name), h('span', '', label));
  button.type = 'button';
  return button;
}

function post(message: FromView): void {
  vscode.postMessage(message);
}

function ago(ms: number): string {
  const minutes = Math.round((Date.now() - ms) / 60_000);
  if (minutes < 1) {
    return 'just now';
  }
  if (minutes < 60) {
    return `${minutes} min ago`;
  }
  const hours = Math.round(minutes / 60);
  return hours < 24 ? `${hours} h ago` : new Date(ms).toLocaleDateString();
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

// ---- conversation ----------------------------------------------------------------------------

interface TurnView {
  turn: Turn;
  steps: HTMLElement;
  rendered: { element: HTMLElement; key: string }[];
  typing: HTMLElement;
  note: HTMLElement;
}

let views: TurnView[] = [];

function emptyState(): HTMLElement {
  return h('div', 'empty',
    h('div', 'empty-logo', icon('sparkle')),
    h('h2', '', 'Ask Tramontane'),
    h('p', '', 'Questions about your code, answered by the model on your machine.'),
    h('ul', 'empty-tips',
      h('li', '', icon('file'), 'The active file goes along (remove its chip to leave it out).'),
      h('li', '', icon('selection'), 'Select code and run Tramontane: Ask About Selection.'),
      h('li', '', icon('image'), 'Paste a screenshot, or drop an image file here.'),
      h('li', '', icon('tool'), 'It can read and search the workspace, and propose edits you review.')));
}

function contextChip(label: string, name: IconName, uri: string): HTMLElement {
  const chip = h('span', 'chip small', icon(name), h('span', 'chip-label', label));
  chip.title = uri;
  return chip;
}

function userView(turn: Turn): HTMLElement {
  const user = turn.user;
  const bubble = h('div', 'bubble');
  if (user.context !== undefined) {
    bubble.append(h('div', 'bubble-context', contextChip(user.context.label,
      user.context.range === undefined ? 'file' : 'selection', user.context.uri)));
  }
  if (user.text !== '') {
    bubble.append(h('div', 'user-text', user.text));
  }
  if (user.images.length > 0) {
    const row = h('div', 'bubble-images');
    for (const url of user.images) {
      const image = h('img', 'thumb');
      image.src = url;
      image.alt = 'attached image';
      row.append(image);
    }
    bubble.append(row);
  }
  if ((user.droppedImages ?? 0) > 0) {
    bubble.append(h('div', 'dropped', `${user.droppedImages ?? 0} image(s) not kept after a reload`));
  }
  return h('div', 'msg user', h('div', 'who', icon('user'), h('span', '', 'You')), bubble);
}

function argumentsPreview(args: unknown): string {
  let value: unknown = args;
  if (typeof args === 'string') {
    try {
      value = JSON.parse(args);
    } catch {
      return args.slice(0, 60); // not JSON: its start
    }
  }
  if (value === null || typeof value !== 'object') {
    return JSON.stringify(value).slice(0, 60);
  }
  const text = Object.entries(value as Record<string, unknown>)
    .map(([k, v]) => `${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`).join(', ');
  return text.length > 60 ? `${text.slice(0, 59)}…` : text;
}

function toolView(step: ToolStep, open: boolean): HTMLElement {
  const running = step.result === undefined;
  const status = running
    ? h('span', 'tool-status running', h('span', 'spinner'))
    : h('span', `tool-status ${step.isError === true ? 'failed' : 'ok'}`,
      icon(step.isError === true ? 'error' : 'check'));
  const summary = h('summary', '', icon('chevron'), icon('tool'),
    h('span', 'tool-name', step.name), h('span', 'tool-args', argumentsPreview(step.arguments)),
    status);
  const body = h('div', 'tool-body',
    h('div', 'tool-label', 'Arguments'),
    h('pre', 'tool-pre', formatArguments(step.arguments)));
  if (running) {
    body.append(h('div', 'tool-label', 'Running…'));
  } else {
    body.append(h('div', 'tool-label', step.isError === true ? 'Error' : 'Result'),
      h('pre', step.isError === true ? 'tool-pre error' : 'tool-pre', step.result ?? ''));
  }
  const details = h('details', `tool${step.isError === true ? ' failed' : ''}${running ? ' running' : ''}`,
    summary, body);
  details.open = open;
  return details;
}

function decorateCode(root: HTMLElement): void {
  for (const pre of root.querySelectorAll('pre')) {
    const code = pre.querySelector('code');
    if (code === null) {
      continue;
    }
    const language = /language-([\w+#.-]+)/.exec(code.className)?.[1] ?? '';
    const insert = labelButton('insert', 'Insert', 'code-action insert');
    insert.title = 'Insert at the cursor';
    const copy = labelButton('copy', 'Copy', 'code-action copy');
    copy.title = 'Copy';
    insert.addEventListener('click', () => { post({ type: 'insert', code: code.textContent }); });
    copy.addEventListener('click', () => {
      post({ type: 'copy', code: code.textContent });
      const label = copy.querySelector('span');
      if (label !== null) {
        label.textContent = 'Copied';
        setTimeout(() => { label.textContent = 'Copy'; }, 1200);
      }
    });
    const block = h('div', 'code-block',
      h('div', 'code-toolbar', h('span', 'code-lang', language), h('div', 'spacer'), insert, copy));
    pre.replaceWith(block);
    block.append(pre);
  }
}

function stepView(step: Step, previous: HTMLElement | undefined): HTMLElement {
  if (step.kind === 'tool') {
    return toolView(step, previous instanceof HTMLDetailsElement && previous.open);
  }
  const element = h('div', 'md');
  element.append(renderMarkdown(step.text, document));
  decorateCode(element);
  return element;
}

function stepKey(step: Step): string {
  return step.kind === 'text'
    ? `text:${step.text.length}`
    : `tool:${step.id}:${step.result === undefined ? 'running' : 'done'}`;
}

function noteClass(status: TurnStatus): string {
  return status === 'error' ? 'note error' : status === 'stop' ? 'note' : 'note warn';
}

function updateTurn(view: TurnView): void {
  const assistant: AssistantEntry = view.turn.assistant;
  assistant.steps.forEach((step, index) => {
    const key = stepKey(step);
    const old = view.rendered[index];
    if (old?.key === key) {
      return;
    }
    const element = stepView(step, old?.element);
    if (old === undefined) {
      view.steps.append(element);
    } else {
      old.element.replaceWith(element);
    }
    view.rendered[index] = { element, key };
  });
  const streaming = assistant.status === 'streaming';
  view.typing.hidden = !streaming;
  view.note.textContent = assistant.note ?? '';
  view.note.className = noteClass(assistant.status);
  view.note.hidden = assistant.note === undefined;
}

function turnView(turn: Turn): TurnView {
  const steps = h('div', 'steps');
  const typing = h('div', 'typing', h('span', ''), h('span', ''), h('span', ''));
  const note = h('div', 'note');
  const view: TurnView = { turn, steps, rendered: [], typing, note };
  log.append(h('section', 'turn', userView(turn),
    h('div', 'msg assistant', h('div', 'who', icon('sparkle'), h('span', '', 'Tramontane')),
      steps, typing, note)));
  updateTurn(view);
  return view;
}

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
    views = chat.turns.map(turnView);
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
    case 'turnStart':
      if (chat?.id !== message.chatId) {
        return;
      }
      if (chat.turns.length === 0) {
        log.replaceChildren();
      }
      chat.turns.push(message.turn);
      views.push(turnView(message.turn));
      updateBusy();
      scrollToEnd();
      return;
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
