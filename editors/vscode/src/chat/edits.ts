/**
 * `workspace/applyEdit` from the chat's `propose_edit` tool: nothing changes without the user.
 *
 * The server marks its edits with a change annotation that needs confirmation, and VS Code
 * then opens the refactor preview instead of applying. This side does not rely on it: every
 * edit that arrives is rewritten so that each text edit and file operation carries an
 * annotation with `needsConfirmation: true` (the server's own annotation, forced on, or ours).
 * `changes` (a plain map) becomes `documentChanges`, the only form that carries annotations.
 */

import type { Range } from './protocol';

export interface ChangeAnnotation {
  label: string;
  needsConfirmation?: boolean;
  description?: string;
}

export interface TextEdit {
  range: Range;
  newText: string;
  annotationId?: string;
}

export interface TextDocumentEdit {
  textDocument: { uri: string; version: number | null };
  edits: TextEdit[];
}

export interface FileOperation {
  kind: 'create' | 'rename' | 'delete';
  annotationId?: string;
  [key: string]: unknown;
}

export type DocumentChange = TextDocumentEdit | FileOperation;

export interface WorkspaceEdit {
  changes?: Record<string, TextEdit[]>;
  documentChanges?: DocumentChange[];
  changeAnnotations?: Record<string, ChangeAnnotation>;
}

export interface ApplyEditParams {
  label?: string;
  edit: WorkspaceEdit;
}

export const ANNOTATION_ID = 'tramontane.proposedEdit';

export function isTextDocumentEdit(change: DocumentChange): change is TextDocumentEdit {
  return !('kind' in change);
}

/** The edit, with every part needing the user's confirmation. */
export function requireConfirmation(edit: WorkspaceEdit, label?: string): WorkspaceEdit {
  const annotations: Record<string, ChangeAnnotation> = {};
  for (const [id, annotation] of Object.entries(edit.changeAnnotations ?? {})) {
    annotations[id] = { ...annotation, needsConfirmation: true };
  }
  let ours = false as boolean;
  const annotate = (id: string | undefined): string => {
    if (id !== undefined && id in annotations) {
      return id;
    }
    ours = true;
    return ANNOTATION_ID;
  };
  const changes: DocumentChange[] = edit.documentChanges !== undefined
    ? edit.documentChanges.map((change) => isTextDocumentEdit(change)
      ? { textDocument: change.textDocument,
        edits: change.edits.map((e) => ({ ...e, annotationId: annotate(e.annotationId) })) }
      : { ...change, annotationId: annotate(change.annotationId) })
    : Object.entries(edit.changes ?? {}).map(([uri, edits]) => ({
      textDocument: { uri, version: null },
      edits: edits.map((e) => ({ ...e, annotationId: annotate(e.annotationId) })),
    }));
  if (ours) {
    annotations[ANNOTATION_ID] = {
      label: label ?? 'Tramontane: proposed edit',
      needsConfirmation: true,
      description: 'proposed in the chat',
    };
  }
  return { documentChanges: changes, changeAnnotations: annotations };
}

/** Whether every part of an edit needs confirmation (what `requireConfirmation` ensures). */
export function needsConfirmation(edit: WorkspaceEdit): boolean {
  const annotations = edit.changeAnnotations ?? {};
  const confirmed = (id: string | undefined): boolean =>
    id !== undefined && annotations[id]?.needsConfirmation === true;
  if (edit.changes !== undefined && Object.values(edit.changes).some((e) => e.length > 0)) {
    return false;
  }
  return (edit.documentChanges ?? []).every((change) => isTextDocumentEdit(change)
    ? change.edits.every((e) => confirmed(e.annotationId))
    : confirmed(change.annotationId));
}

/** The documents an edit touches, for the chat's own record of it. */
export function editedUris(edit: WorkspaceEdit): string[] {
  const uris = new Set<string>(Object.keys(edit.changes ?? {}));
  for (const change of edit.documentChanges ?? []) {
    if (isTextDocumentEdit(change)) {
      uris.add(change.textDocument.uri);
    } else {
      const uri = change.uri ?? change.oldUri;
      if (typeof uri === 'string') {
        uris.add(uri);
      }
    }
  }
  return [...uris];
}
