/**
 * What the status bar shows: the server's `tramontane/status` notifications
 * (`{state, message, reason?}`), plus what only the extension knows (the server is starting,
 * stopped, or completions are off here). Pure: the view is data, extension.ts paints it.
 */

export const STATUS_METHOD = 'tramontane/status';

export type ServerState = 'loading' | 'ready' | 'busy' | 'error';
export type State = 'starting' | ServerState | 'stopped';

export interface Status {
  state: State;
  message: string;
  /** Why the last completion came back empty (as the server words it). */
  reason?: string;
}

export type Severity = 'normal' | 'warning' | 'error';

export interface StatusView {
  /** Status bar text, with VS Code's `$(icon)` syntax. */
  text: string;
  tooltip: string;
  severity: Severity;
}

const SERVER_STATES: readonly string[] = ['loading', 'ready', 'busy', 'error'];

/** The server's reasons (lsp_server/completions.py) and what the user can do about each. */
export const REASON_HINTS: Readonly<Record<string, string>> = {
  'no model':
    'No model is loaded. Set `tramontane.model` to a Mistral checkpoint folder ' +
    '(`tramontane download mistralai/Codestral-22B-v0.1` fetches one).',
  cancelled:
    'The request was cancelled because you kept typing or moved the cursor: this is normal.',
  'budget exhausted':
    'The time budget ran out before anything was generated: raise ' +
    '`tramontane.completion.timeBudgetMs`, use a smaller model or a GPU (`tramontane.device`).',
  'nothing useful':
    'The model had nothing worth showing here (an empty completion, or only a repeat of the ' +
    'text after the cursor). Type on and it will try again.',
  'disabled for this language':
    'This language is not in `tramontane.completion.enabledLanguages`.',
  error: 'The completion failed: the *Tramontane* output channel (Show Log) says why.',
};

/** A `tramontane/status` payload, or undefined if it is not one (a newer server may add
 * fields: they are ignored; a missing or unknown state is refused). */
export function parseStatus(params: unknown): Status | undefined {
  if (params === null || typeof params !== 'object') {
    return undefined;
  }
  const { state, message, reason } = params as Record<string, unknown>;
  if (typeof state !== 'string' || !SERVER_STATES.includes(state)) {
    return undefined;
  }
  const status: Status = {
    state: state as ServerState,
    message: typeof message === 'string' ? message : '',
  };
  if (typeof reason === 'string' && reason !== '') {
    status.reason = reason;
  }
  return status;
}

export type Listener = (status: Status) => void;

export class StatusModel {
  private current: Status = { state: 'starting', message: 'Starting the language server' };
  private readonly listeners = new Set<Listener>();

  get status(): Status {
    return this.current;
  }

  /** Applies a `tramontane/status` notification; false (and no change) if malformed. */
  update(params: unknown): boolean {
    const status = parseStatus(params);
    if (status === undefined) {
      return false;
    }
    this.set(status);
    return true;
  }

  starting(): void {
    this.set({ state: 'starting', message: 'Starting the language server' });
  }

  stopped(message: string): void {
    this.set({ state: 'stopped', message });
  }

  onDidChange(listener: Listener): { dispose(): void } {
    this.listeners.add(listener);
    return { dispose: () => this.listeners.delete(listener) };
  }

  private set(status: Status): void {
    this.current = status;
    for (const listener of this.listeners) {
      listener(status);
    }
  }
}

/**
 * The status bar item for a status. `off` is set when `tramontane.enable` turns completions
 * off for the active editor's language (its text says where, e.g. "off for markdown"): that
 * wins over the server's state, since no request is even sent.
 */
export function statusView(status: Status, off?: string): StatusView {
  const click = 'Click for the Tramontane menu.';
  if (off !== undefined) {
    return {
      text: '$(circle-slash) Tramontane',
      tooltip: `Completions are ${off}. ${click}`,
      severity: 'normal',
    };
  }
  const message = status.message === '' ? '' : `${status.message}\n\n`;
  switch (status.state) {
    case 'starting':
      return { text: '$(loading~spin) Tramontane', tooltip: `${message}${click}`, severity: 'normal' };
    case 'loading':
      return { text: '$(loading~spin) Tramontane', tooltip: `${message}${click}`, severity: 'normal' };
    case 'busy':
      return { text: '$(sync~spin) Tramontane', tooltip: `${message}${click}`, severity: 'normal' };
    case 'stopped':
      return { text: '$(debug-disconnect) Tramontane', tooltip: `${message}${click}`, severity: 'error' };
    case 'error': {
      const why = status.reason === undefined ? '' : `: ${status.reason}`;
      const hint = status.reason === undefined ? '' : `${REASON_HINTS[status.reason] ?? ''}\n\n`;
      return { text: `$(error) Tramontane${why}`, tooltip: `${message}${hint}${click}`, severity: 'error' };
    }
    case 'ready': {
      if (status.reason === undefined) {
        return { text: '$(check) Tramontane', tooltip: `${message}${click}`, severity: 'normal' };
      }
      const hint = REASON_HINTS[status.reason] ?? '';
      return {
        text: `$(circle-outline) Tramontane: ${status.reason}`,
        tooltip: `Last completion empty: ${status.reason}. ${hint}\n\n${message}${click}`,
        severity: status.reason === 'error' || status.reason === 'no model' ? 'warning' : 'normal',
      };
    }
  }
}
