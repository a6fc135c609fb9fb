/**
 * Drawing the conversation: a turn's user message (text, context chip, images) and the
 * assistant's steps (Markdown, with Insert and Copy on code blocks; tool calls as collapsible
 * steps, errors in red), its typing dots and its closing note.
 */

import type { AssistantEntry, Step, ToolStep, Turn, TurnStatus } from '../model';
import { formatArguments } from '../protocol';
import { h, labelButton } from './dom';
import { icon, type IconName } from './icons';
import { renderMarkdown } from './markdown';

/** What a code block's buttons do (the page posts them to the extension). */
export interface CodeActions {
  insert(code: string): void;
  copy(code: string): void;
}

/** One turn on the page, and what is drawn of its steps (redrawn only when they change). */
export interface TurnView {
  turn: Turn;
  element: HTMLElement;
  steps: HTMLElement;
  rendered: { element: HTMLElement; key: string }[];
  typing: HTMLElement;
  note: HTMLElement;
  actions: CodeActions;
}

export function emptyState(): HTMLElement {
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

function decorateCode(root: HTMLElement, actions: CodeActions): void {
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
    insert.addEventListener('click', () => { actions.insert(code.textContent); });
    copy.addEventListener('click', () => {
      actions.copy(code.textContent);
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

function stepView(step: Step, previous: HTMLElement | undefined, actions: CodeActions):
HTMLElement {
  if (step.kind === 'tool') {
    return toolView(step, previous instanceof HTMLDetailsElement && previous.open);
  }
  const element = h('div', 'md');
  element.append(renderMarkdown(step.text, document));
  decorateCode(element, actions);
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

export function updateTurn(view: TurnView): void {
  const assistant: AssistantEntry = view.turn.assistant;
  assistant.steps.forEach((step, index) => {
    const key = stepKey(step);
    const old = view.rendered[index];
    if (old?.key === key) {
      return;
    }
    const element = stepView(step, old?.element, view.actions);
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

/** Draws a turn (its element is the caller's to place). */
export function turnView(turn: Turn, actions: CodeActions): TurnView {
  const steps = h('div', 'steps');
  const typing = h('div', 'typing', h('span', ''), h('span', ''), h('span', ''));
  const note = h('div', 'note');
  const element = h('section', 'turn', userView(turn),
    h('div', 'msg assistant', h('div', 'who', icon('sparkle'), h('span', '', 'Tramontane')),
      steps, typing, note));
  const view: TurnView = { turn, element, steps, rendered: [], typing, note, actions };
  updateTurn(view);
  return view;
}
