/** Small DOM helpers for the chat page. */

import { icon, type IconName } from './icons';

export type Child = Node | string | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(tag: K, className?: string,
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

export function iconButton(name: IconName, title: string, className = 'icon-button'): HTMLButtonElement {
  const button = h('button', className, icon(name));
  button.type = 'button';
  button.title = title;
  button.setAttribute('aria-label', title);
  return button;
}

export function labelButton(name: IconName, label: string, className: string): HTMLButtonElement {
  const button = h('button', className, icon(name), h('span', '', label));
  button.type = 'button';
  return button;
}

export function ago(ms: number): string {
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
