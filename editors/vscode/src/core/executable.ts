/**
 * Is the server command there? Checked before starting the client, so a missing `lsp_server`
 * gives one clear notice instead of the client library's retries and generic errors.
 */

import { accessSync, constants, statSync } from 'node:fs';
import { delimiter, isAbsolute, join, resolve } from 'node:path';

function isExecutableFile(path: string): boolean {
  try {
    if (!statSync(path).isFile()) {
      return false;
    }
    accessSync(path, process.platform === 'win32' ? constants.F_OK : constants.X_OK);
    return true;
  } catch {
    // statSync/accessSync throw for a missing or unreadable path: that is the "no" answer.
    return false;
  }
}

/**
 * The executable `command` names, as a shell would find it: a path (absolute, or relative to
 * `cwd`, when it has a separator), else the first match on `PATH` (with Windows' PATHEXT
 * suffixes there). Undefined when there is none.
 */
export function findExecutable(
  command: string,
  env: NodeJS.ProcessEnv = process.env,
  cwd: string = process.cwd(),
): string | undefined {
  if (command === '') {
    return undefined;
  }
  const suffixes =
    process.platform === 'win32'
      ? ['', ...(env.PATHEXT ?? '.EXE;.CMD;.BAT').split(';').filter((s) => s !== '')]
      : [''];
  const candidates = (base: string): string[] => suffixes.map((suffix) => base + suffix);
  if (command.includes('/') || command.includes('\\') || isAbsolute(command)) {
    return candidates(resolve(cwd, command)).find(isExecutableFile);
  }
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (dir === '') {
      continue;
    }
    const found = candidates(join(dir, command)).find(isExecutableFile);
    if (found !== undefined) {
      return found;
    }
  }
  return undefined;
}
