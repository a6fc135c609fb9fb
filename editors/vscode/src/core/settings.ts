/**
 * VS Code settings (`tramontane.*`, declared once in package.json) -> what the server is sent.
 *
 * The server is the one validator: values are passed through as the user wrote them, and a bad
 * one comes back as a `window/showMessage` warning naming the key (see notices.ts). This module
 * only reshapes the flat VS Code keys into the server's tree, fills in the home folder, and says
 * which changes need a restart. No `vscode` import: it runs in plain Node.
 */

export const SECTION = 'tramontane';

/** The server's nested settings, by section: `completion.*`, `cache.*`, `chat.*` and
 * `backend.*` on both sides. */
export const SECTIONS = {
  completion: [
    'maxTokens',
    'prefixTokens',
    'suffixTokens',
    'timeBudgetMs',
    'debounceMs',
    'temperature',
    'enabledLanguages',
    'adapter',
    'lookup',
  ],
  cache: ['enabled', 'budgetMiB'],
  chat: [
    'maxTokens',
    'temperature',
    'maxToolSteps',
    'toolTimeoutMs',
    'toolOutputChars',
    'deniedPaths',
    'maxImageMiB',
  ],
  backend: ['kind', 'url', 'model', 'tokenizer', 'apiKeyEnv', 'maxRequestsPerSecond', 'caBundle'],
} as const satisfies Record<string, readonly string[]>;

export type Section = keyof typeof SECTIONS;
const SECTION_NAMES = Object.keys(SECTIONS) as Section[];

/** The server's top-level settings. */
export const SERVER_KEYS = ['model', 'device', 'dtype', 'quantize', 'compile', 'adapters'] as const;

/** Every server setting, as a key under `tramontane.` (e.g. `completion.maxTokens`). */
export const SERVER_SETTING_KEYS: readonly string[] = [
  ...SERVER_KEYS,
  ...SECTION_NAMES.flatMap((section) => SECTIONS[section].map((key) => `${section}.${key}`)),
];

/** Settings the extension keeps for itself: never sent to the server. */
export const CLIENT_KEYS = ['serverCommand', 'serverArgs', 'enable'] as const;

/** Changing these means starting a new server process. */
const RESTART_KEYS: readonly string[] = ['serverCommand', 'serverArgs'];

/** Reads one setting by its key under the section, e.g. `completion.maxTokens`. */
export type SettingsGetter = (key: string) => unknown;

export interface InitializationOptions {
  model?: unknown;
  device?: unknown;
  dtype?: unknown;
  quantize?: unknown;
  compile?: unknown;
  adapters?: unknown;
  completion: Record<string, unknown>;
  cache: Record<string, unknown>;
  chat: Record<string, unknown>;
  backend: Record<string, unknown>;
}

export interface ServerCommand {
  command: string;
  args: string[];
}

/** `~` and `~/...` name the home folder; an empty path means no model (`null`). */
export function modelPath(value: unknown, home: string): unknown {
  if (typeof value !== 'string') {
    return value ?? null;
  }
  const path = value.trim();
  if (path === '') {
    return null;
  }
  if (path === '~') {
    return home;
  }
  if (path.startsWith('~/')) {
    return home.replace(/\/+$/, '') + path.slice(1);
  }
  return path;
}

/** The server's settings tree, sent as `initializationOptions` and on every change. */
export function initializationOptions(get: SettingsGetter, home: string): InitializationOptions {
  const options: InitializationOptions = { completion: {}, cache: {}, chat: {}, backend: {} };
  for (const key of SERVER_KEYS) {
    const value = get(key);
    if (value !== undefined) {
      options[key] = key === 'model' ? modelPath(value, home) : value;
    }
  }
  for (const section of SECTION_NAMES) {
    for (const key of SECTIONS[section]) {
      const value = get(`${section}.${key}`);
      if (value !== undefined) {
        options[section][key] = value;
      }
    }
  }
  return options;
}

/** `workspace/didChangeConfiguration` params, in VS Code's section layout (the server takes
 * either that or the bare object). */
export function configurationChange(get: SettingsGetter, home: string): {
  settings: { tramontane: InitializationOptions };
} {
  return { settings: { [SECTION]: initializationOptions(get, home) } };
}

/** The command line that starts the server; `--stdio` is added unless the user gave it. */
export function serverCommand(get: SettingsGetter): ServerCommand {
  const raw = get('serverCommand');
  const command = typeof raw === 'string' && raw.trim() !== '' ? raw.trim() : 'lsp_server';
  const rawArgs = get('serverArgs');
  const args = Array.isArray(rawArgs)
    ? rawArgs.filter((arg): arg is string => typeof arg === 'string')
    : [];
  return { command, args: args.includes('--stdio') ? args : ['--stdio', ...args] };
}

/** Whether a configuration change needs a new server process (`affects` is VS Code's
 * `ConfigurationChangeEvent.affectsConfiguration`). */
export function needsRestart(affects: (section: string) => boolean): boolean {
  return RESTART_KEYS.some((key) => affects(`${SECTION}.${key}`));
}

/** Whether a change concerns the server at all (otherwise nothing is sent). */
export function concernsServer(affects: (section: string) => boolean): boolean {
  return (
    SERVER_KEYS.some((key) => affects(`${SECTION}.${key}`)) ||
    SECTION_NAMES.some((section) => affects(`${SECTION}.${section}`))
  );
}

interface ContributedProperty {
  default?: unknown;
}

/** A getter over the defaults that package.json declares: what VS Code answers for settings
 * nobody changed. Used by the tests, and as the reference for "defaults agree". */
export function declaredDefaults(packageJson: unknown): SettingsGetter {
  const properties = (
    packageJson as {
      contributes?: { configuration?: { properties?: Record<string, ContributedProperty> } };
    }
  ).contributes?.configuration?.properties;
  if (properties === undefined) {
    throw new Error('package.json declares no contributes.configuration.properties');
  }
  return (key: string) => properties[`${SECTION}.${key}`]?.default;
}

/** A getter over a nested settings object (as `workspace.getConfiguration` shows it), with
 * `fallback` for keys it does not set. */
export function overlay(values: Record<string, unknown>, fallback: SettingsGetter): SettingsGetter {
  return (key: string) => {
    let node: unknown = values;
    for (const part of key.split('.')) {
      if (node === null || typeof node !== 'object' || !(part in node)) {
        return fallback(key);
      }
      node = (node as Record<string, unknown>)[part];
    }
    return node;
  };
}
