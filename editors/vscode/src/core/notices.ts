/**
 * Notifications for the user: the server's own `window/showMessage`, a server that cannot be
 * started, a model that is missing. Each is data (severity, text, which setting to open); the
 * extension shows it with an "Open settings" button when `setting` is set.
 */

import { SECTION } from './settings';
import type { Status } from './status';

export type NoticeSeverity = 'error' | 'warning' | 'info';

export interface Notice {
  severity: NoticeSeverity;
  message: string;
  /** The setting that fixes it (e.g. `tramontane.model`): the notice gets "Open settings". */
  setting?: string;
}

export const OPEN_SETTINGS = 'Open settings';
export const SHOW_LOG = 'Show log';

/** LSP MessageType: 1 error, 2 warning, 3 info, 4 log (5 debug, LSP 3.18). */
const SEVERITY: Readonly<Record<number, NoticeSeverity>> = { 1: 'error', 2: 'warning' };

/** The setting a server message is about: its warnings for invalid values read
 * "setting completion.maxTokens = 0 is invalid ..."; its model errors name `model`. */
export function settingNamed(message: string): string | undefined {
  const invalid = /\bsetting ([A-Za-z]+(?:\.[A-Za-z]+)?) = /.exec(message);
  if (invalid?.[1] !== undefined) {
    return `${SECTION}.${invalid[1]}`;
  }
  if (/\bmodel\b/i.test(message)) {
    return `${SECTION}.model`;
  }
  return undefined;
}

/** A server `window/showMessage` as a notice (the message text is the server's, unchanged). */
export function fromShowMessage(params: unknown): Notice | undefined {
  if (params === null || typeof params !== 'object') {
    return undefined;
  }
  const { type, message } = params as Record<string, unknown>;
  if (typeof message !== 'string' || message === '') {
    return undefined;
  }
  const severity = (typeof type === 'number' ? SEVERITY[type] : undefined) ?? 'info';
  const setting = severity === 'info' ? undefined : settingNamed(message);
  return setting === undefined ? { severity, message } : { severity, message, setting };
}

/** The server command is not on PATH (or not executable). */
export function serverNotFound(command: string): Notice {
  return {
    severity: 'error',
    message:
      `Tramontane: the language server \`${command}\` was not found. Install Tramontane ` +
      '(`pip install -e .` in its checkout puts `lsp_server` in the virtual environment) and ' +
      'set `tramontane.serverCommand` to the full path of `lsp_server`.',
    setting: `${SECTION}.serverCommand`,
  };
}

/** The server started but the client could not talk to it (it crashed, or is not ours). */
export function serverFailed(command: string, error: unknown): Notice {
  const why = error instanceof Error ? error.message : String(error);
  return {
    severity: 'error',
    message:
      `Tramontane: the language server \`${command}\` could not be started: ${why}. ` +
      'Its output is in the Tramontane log.',
    setting: `${SECTION}.serverCommand`,
  };
}

/**
 * Decides which notices the model's state deserves. A broken model arrives twice (the
 * server's showMessage error, then status "error" with reason "no model"): the user sees it
 * once. "No model configured" arrives only as a status: it gets its own notice. Each new
 * loading attempt starts afresh.
 */
export class ModelNotices {
  private shown = false;

  /** Returns the notice to show for a server `window/showMessage`. */
  showMessage(params: unknown): Notice | undefined {
    const notice = fromShowMessage(params);
    if (notice?.severity === 'error') {
      this.shown = true;
    }
    return notice;
  }

  /** Returns the notice (if any) that a `tramontane/status` calls for. */
  status(status: Status): Notice | undefined {
    if (status.state === 'loading' || status.state === 'ready') {
      this.shown = false;
      return undefined;
    }
    if (status.state !== 'error' || status.reason !== 'no model' || this.shown) {
      return undefined;
    }
    this.shown = true;
    return {
      severity: 'error',
      message:
        'Tramontane has no model: set `tramontane.model` to a Mistral checkpoint folder ' +
        '(`tramontane download mistralai/Codestral-22B-v0.1` fetches Codestral). ' +
        `The server said: ${status.message}`,
      setting: `${SECTION}.model`,
    };
  }
}
