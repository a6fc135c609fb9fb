"""Results -> lsprotocol types. Every function here is named lsp_*."""

from __future__ import annotations

from lsprotocol import types

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
