"""Results -> lsprotocol types. Every function here is named lsp_*."""

from __future__ import annotations

from lsprotocol import types

from .chat.edits import ProposedEdit
from .completions import Outcome

LABEL_CHARS = 60


def lsp_inline_completion_list(outcome: Outcome,
                               position: types.Position) -> types.InlineCompletionList:
    if not outcome.text:
        return types.InlineCompletionList(items=[])
    item = types.InlineCompletionItem(insert_text=outcome.text,
                                      range=types.Range(start=position, end=position))
    return types.InlineCompletionList(items=[item])


def lsp_completion_list(outcome: Outcome, position: types.Position) -> types.CompletionList:
    """One item whose textEdit inserts the completion at the cursor, for clients without inline
    completion. `is_incomplete` makes the client ask again as the user types."""
    if not outcome.text:
        return types.CompletionList(is_incomplete=True, items=[])
    first_line = outcome.text.strip().splitlines()[0] if outcome.text.strip() else outcome.text
    label = first_line if len(first_line) <= LABEL_CHARS else first_line[:LABEL_CHARS - 1] + "…"
    item = types.CompletionItem(
        label=label,
        kind=types.CompletionItemKind.Text,
        detail="Tramontane",
        documentation=types.MarkupContent(kind=types.MarkupKind.PlainText, value=outcome.text),
        text_edit=types.TextEdit(range=types.Range(start=position, end=position),
                                 new_text=outcome.text),
        insert_text_format=types.InsertTextFormat.PlainText,
        filter_text="",
        sort_text="0",
        preselect=True,
    )
    return types.CompletionList(is_incomplete=True, items=[item])


PROPOSED_EDIT = "tramontane.proposedEdit"


def lsp_proposed_edit(edit: ProposedEdit, encoding: str) -> types.WorkspaceEdit:
    """A chat's `propose_edit` as a WorkspaceEdit whose every change carries an annotation that
    needs confirmation: the editor shows the diff, and nothing changes unless the user accepts
    (and can undo)."""
    edits: list[types.TextEdit | types.AnnotatedTextEdit | types.SnippetTextEdit] = [
        types.AnnotatedTextEdit(range=types.Range(start=start, end=end),
                                new_text=change.new_text, annotation_id=PROPOSED_EDIT)
        for change, (start, end) in zip(edit.edits, edit.ranges(encoding), strict=True)]
    return types.WorkspaceEdit(
        document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(
                uri=edit.uri, version=edit.version),
            edits=edits)],
        change_annotations={PROPOSED_EDIT: types.ChangeAnnotation(
            label="Tramontane: proposed edit", needs_confirmation=True,
            description=f"proposed in the chat for {edit.shown}")})
