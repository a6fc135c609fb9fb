/**
 * What the chat attaches from the editor: the active file and the selection in it, as the chips
 * label them. Only documents the server has (the language client syncs `file` and `untitled`
 * ones) can be attached: `context.uri` must name a document the server knows.
 */

import type { EditorContext } from './messages';
import type { Range } from './protocol';

export const CONTEXT_SCHEMES: readonly string[] = ['file', 'untitled'];

export interface EditorState {
  uri: string;
  scheme: string;
  /** The file's name (no folder). */
  name: string;
  /** The primary selection; an empty one is none. */
  selection?: Range;
}

/** `app.py:12-20` (1-based lines; a selection ending at a line's start ends on the line above). */
export function selectionLabel(name: string, range: Range): string {
  const first = range.start.line + 1;
  const endLine = range.end.character === 0 && range.end.line > range.start.line
    ? range.end.line
    : range.end.line + 1;
  return first === endLine ? `${name}:${first}` : `${name}:${first}-${endLine}`;
}

function isEmpty(range: Range): boolean {
  return range.start.line === range.end.line && range.start.character === range.end.character;
}

export function editorContext(editor: EditorState | undefined): EditorContext {
  if (editor === undefined || !CONTEXT_SCHEMES.includes(editor.scheme)) {
    return {};
  }
  const context: EditorContext = { file: { uri: editor.uri, label: editor.name } };
  if (editor.selection !== undefined && !isEmpty(editor.selection)) {
    context.selection = { uri: editor.uri, range: editor.selection,
      label: selectionLabel(editor.name, editor.selection) };
  }
  return context;
}
