/**
 * The one tool the editor runs itself (`clientTools`): the problems VS Code reports (compiler
 * errors, lint warnings) for a file of the workspace, or for every file. The server cannot see
 * them; the model uses them to explain an error. Output is bounded like the server's tools.
 */

import type { ToolSpec } from './protocol';

export const DIAGNOSTICS_TOOL: ToolSpec = {
  name: 'diagnostics',
  description: 'List the problems (errors, warnings) the editor reports for a workspace file, ' +
    'or for all open files when no path is given, with line numbers.',
  parameters: {
    type: 'object',
    properties: {
      path: { type: 'string', description: 'A file path relative to the workspace folder.' },
    },
    additionalProperties: false,
  },
};

export const MAX_PROBLEMS = 200;

export interface Problem {
  /** Workspace-relative. */
  path: string;
  /** 0-based, as VS Code has them. */
  line: number;
  character: number;
  severity: 'error' | 'warning' | 'info' | 'hint';
  message: string;
  source?: string;
}

/** The `path` argument, or undefined for "all files"; throws a readable error when malformed. */
export function requestedPath(args: unknown): string | undefined {
  if (args === undefined || args === null) {
    return undefined;
  }
  const raw = (typeof args === 'string' ? JSON.parse(args) : args) as { path?: unknown } | null;
  if (typeof raw !== 'object' || raw === null) {
    throw new Error('arguments must be an object');
  }
  if (raw.path === undefined || raw.path === '') {
    return undefined;
  }
  if (typeof raw.path !== 'string') {
    throw new Error('path must be a string');
  }
  return raw.path.replace(/^\.\//, '');
}

/** One line per problem, errors first, at most MAX_PROBLEMS (the last line says how many more). */
export function formatProblems(problems: readonly Problem[], path: string | undefined): string {
  if (problems.length === 0) {
    return path === undefined ? 'No problems reported.' : `No problems reported in ${path}.`;
  }
  const order = ['error', 'warning', 'info', 'hint'];
  const sorted = [...problems].sort((a, b) => order.indexOf(a.severity) - order.indexOf(b.severity) ||
    a.path.localeCompare(b.path) || a.line - b.line || a.character - b.character);
  const lines = sorted.slice(0, MAX_PROBLEMS).map((p) =>
    `${p.path}:${p.line + 1}:${p.character + 1}: ${p.severity}: ${p.message.replace(/\s+/g, ' ')}` +
    (p.source === undefined ? '' : ` [${p.source}]`));
  if (sorted.length > MAX_PROBLEMS) {
    lines.push(`… and ${sorted.length - MAX_PROBLEMS} more`);
  }
  return lines.join('\n');
}
