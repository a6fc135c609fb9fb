"""propose_edit: the model's edits, checked against the file's current text and handed to the
loop as a `ProposedEdit`, which the loop sends to the editor as `workspace/applyEdit` (the
user reviews, accepts or refuses it there). Nothing here writes a file.

Positions are LSP's as the model writes them: 0-based lines, characters in UTF-16 code units
(the protocol's default; line n of read_file is line n - 1 here). The current text is the
editor's when the document is open (unsaved changes included: what the user sees and what
the edit will apply to), else the file on disk, which must then be UTF-8 text. Each range must
lie inside that text (a position past a line's end or inside a surrogate pair is an error,
never clamped: the model would be editing somewhere it did not mean), and the ranges must not
overlap (LSP forbids it; ranges that only touch are fine, and inserts at one position apply in
the order given). Edits keep the order the model gave them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol.types import Position

from ..documents import Document, PositionError
from .errors import ToolError
from .filetools import MAX_FILE_BYTES, OpenDocument, is_binary, size_text
from .sandbox import Workspace, read_limited, show_path


@dataclass(frozen=True)
class TextReplacement:
    start: int  # code-point offsets into ProposedEdit.text
    end: int
    new_text: str


@dataclass(frozen=True)
class ProposedEdit:
    path: Path  # the real path
    uri: str  # the open document's URI, else the path's file URI
    shown: str  # the path as tools show it to the model
    text: str  # the text the edits were checked against
    version: int | None  # the open document's version; None when read from disk
    edits: tuple[TextReplacement, ...]

    def ranges(self, encoding: str) -> list[tuple[Position, Position]]:
        """Each edit's range in the client's position encoding ("utf-16", "utf-8",
        "utf-32"), for the WorkspaceEdit."""
        document = Document(self.uri, "", 0, self.text)
        return [(document.position_at(edit.start, encoding),
                 document.position_at(edit.end, encoding)) for edit in self.edits]

    def summary(self) -> str:
        count = len(self.edits)
        return (f"proposed {count} edit{'s' if count != 1 else ''} to {self.shown}; the user "
                "reviews them in the editor")


def _current_text(real: Path, given: str) -> str:
    shown = show_path(given)
    try:
        data = read_limited(real, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ToolError(f"path {shown} does not exist (propose_edit changes existing files)"
                        ) from None
    except OSError as e:
        raise ToolError(f"path {shown} cannot be read ({e.strerror})") from None
    if data is None:
        raise ToolError(f"path {shown} is not a regular file")
    if len(data) > MAX_FILE_BYTES:
        raise ToolError(f"path {shown} is larger than {size_text(MAX_FILE_BYTES)}: too large "
                        "to edit here")
    if is_binary(data):
        raise ToolError(f"path {shown} is a binary file, not text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ToolError(f"path {shown} is not UTF-8 text; open it in the editor first") from None


def _where(position: dict[str, Any]) -> str:
    return f"(line {position['line']}, character {position['character']})"


def propose_edit(args: dict[str, Any], workspace: Workspace,
                 open_document: OpenDocument | None = None) -> ProposedEdit:
    given: str = args["path"]
    real = workspace.resolve(given)
    document = open_document(real) if open_document is not None else None
    if document is not None:
        text, uri, version = document.text, document.uri, document.version
    else:
        text, uri, version = _current_text(real, given), real.as_uri(), None
    check = Document(uri, "", 0, text)
    placed = []
    for index, edit in enumerate(args["edits"]):
        start, end = edit["range"]["start"], edit["range"]["end"]
        try:
            begin, finish = check.range_offsets(
                Position(line=int(start["line"]), character=int(start["character"])),
                Position(line=int(end["line"]), character=int(end["character"])), "utf-16")
        except PositionError as e:
            raise ToolError(f"edits[{index}].range: {e}") from None
        placed.append((begin, finish, index, edit))
    ordered = sorted(placed, key=lambda p: (p[0], p[1], p[2]))
    for before, after in itertools.pairwise(ordered):
        if after[0] < before[1]:
            first, second = sorted((before, after), key=lambda p: p[2])
            raise ToolError(
                f"edits[{first[2]}] {_where(first[3]['range']['start'])}-"
                f"{_where(first[3]['range']['end'])} and edits[{second[2]}] "
                f"{_where(second[3]['range']['start'])}-{_where(second[3]['range']['end'])} "
                "overlap; merge them into one edit")
    return ProposedEdit(
        path=real, uri=uri, shown=workspace.display(real), text=text, version=version,
        edits=tuple(TextReplacement(begin, finish, edit["newText"])
                    for begin, finish, _, edit in placed))
