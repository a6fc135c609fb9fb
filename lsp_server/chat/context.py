"""The editor's context (the open document, or a range of it) attached to the user's message.

The attachment is a text part placed before what the user wrote: a line naming the file (and
the lines), then the text in a fenced block. The expanded message goes back to the editor with
the turn's result, so the next turn sends the same prompt prefix and the chat's cache holds.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from lsprotocol import types

from ..documents import Document, DocumentError
from .params import ParamsError


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks inside `text`."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _name(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def attachment(document: Document, span: dict[str, Any] | None, encoding: str) -> str:
    """The text part for `document` (or the LSP range `span` of it)."""
    text = document.text
    where = ""
    if span is not None:
        try:
            start = types.Position(**span["start"])
            end = types.Position(**span["end"])
            lo = document.offset_at(start, encoding)
            hi = document.offset_at(end, encoding)
        except (KeyError, TypeError, DocumentError) as e:
            raise ParamsError(f"context.range is not a range of {document.uri}: {e}") from None
        if hi < lo:
            raise ParamsError("context.range ends before it starts")
        text = text[lo:hi]
        where = f", lines {start.line + 1}-{end.line + 1}"
    language = document.language_id or PurePosixPath(_name(document.uri)).suffix.lstrip(".")
    fence = _fence(text)
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"{_name(document.uri)}{where}:\n{fence}{language}\n{body}{fence}\n\n"


def with_context(message: dict[str, Any], part: str) -> dict[str, Any]:
    """`message` (the user's) with `part` before its text."""
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [{"type": "text", "text": part}, *content]}
    return {**message, "content": part + (content or "")}
