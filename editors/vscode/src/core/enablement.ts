/**
 * `tramontane.enable`: where completions are on, by language id, with `"*"` for the rest
 * (`{"*": true, "markdown": false}`). The extension checks it before asking the server, so a
 * language that is off costs nothing. The toggle commands compute the new map here.
 */

export const ALL = '*';

export type EnableMap = Readonly<Record<string, boolean>>;

/** Reads the setting leniently: anything but an object of booleans counts as "all on". */
export function enableMap(value: unknown): EnableMap {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    return { [ALL]: true };
  }
  const map: Record<string, boolean> = {};
  for (const [language, on] of Object.entries(value as Record<string, unknown>)) {
    if (typeof on === 'boolean') {
      map[language] = on;
    }
  }
  return map;
}

/** The language's own entry wins; then `"*"`; on when neither is set. */
export function isEnabled(map: EnableMap, languageId: string): boolean {
  return map[languageId] ?? map[ALL] ?? true;
}

/** Everywhere: flip `"*"`, keeping the languages turned off one by one (they stay off when
 * completions come back on) and dropping the ones turned on one by one (off means off). */
export function toggleEverywhere(map: EnableMap): EnableMap {
  const next: Record<string, boolean> = { [ALL]: !isEnabled(map, ALL) };
  for (const [language, on] of Object.entries(map)) {
    if (!on && language !== ALL) {
      next[language] = false;
    }
  }
  return next;
}

/** One language: flip its effective state; an entry equal to `"*"` is dropped, not kept. */
export function toggleLanguage(map: EnableMap, languageId: string): EnableMap {
  if (languageId === ALL) {
    return toggleEverywhere(map);
  }
  const want = !isEnabled(map, languageId);
  const others = Object.entries(map).filter(([language]) => language !== languageId);
  // An entry that says the same as "*" is dropped rather than kept.
  const entry: [string, boolean][] = want === (map[ALL] ?? true) ? [] : [[languageId, want]];
  return Object.fromEntries([...others, ...entry]);
}

/** What the toggle menu and the status bar say about the current state. */
export function describe(map: EnableMap, languageId: string | undefined): string {
  const everywhere = isEnabled(map, ALL);
  if (languageId === undefined) {
    return everywhere ? 'on' : 'off everywhere';
  }
  const here = isEnabled(map, languageId);
  if (here) {
    return 'on';
  }
  return everywhere ? `off for ${languageId}` : 'off everywhere';
}
