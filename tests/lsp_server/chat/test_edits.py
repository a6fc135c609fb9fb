"""propose_edit: edits checked against the current text (UTF-16 positions, in range, no
overlap) and returned as a ProposedEdit; nothing is written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from lsprotocol.types import Position

from lsp_server.chat.edits import ProposedEdit, TextReplacement, propose_edit
from lsp_server.chat.errors import ToolError
from lsp_server.chat.sandbox import Workspace
from lsp_server.chat.tools import run_tool
from lsp_server.documents import Document

TEXT = "é = '😀'\nsecond line\n"


def edit(start: tuple[int, int], end: tuple[int, int], new_text: str) -> dict[str, Any]:
    return {"range": {"start": {"line": start[0], "character": start[1]},
                      "end": {"line": end[0], "character": end[1]}}, "newText": new_text}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "a.py").write_text(TEXT, encoding="utf-8")
    return tmp_path


def refused(project: Path, edits: list[dict[str, Any]], path: str = "a.py") -> str:
    with pytest.raises(ToolError) as caught:
        propose_edit({"path": path, "edits": edits}, Workspace([project]))
    return str(caught.value)


def test_valid_edits_become_a_proposed_edit_with_offsets(project: Path) -> None:
    proposed = propose_edit(
        {"path": "a.py", "edits": [edit((1, 0), (1, 6), "2nd"), edit((0, 4), (0, 8), "'ok'")]},
        Workspace([project]))
    real = (project / "a.py").resolve()
    assert proposed == ProposedEdit(
        path=real, uri=real.as_uri(), shown="a.py", text=TEXT, version=None,
        # "😀" is two UTF-16 units: characters 4-8 of line 0 ("'😀'") are code points 4-7.
        edits=(TextReplacement(8, 14, "2nd"), TextReplacement(4, 7, "'ok'")))
    assert proposed.summary() == "proposed 2 edits to a.py; the user reviews them in the editor"
    assert (project / "a.py").read_text(encoding="utf-8") == TEXT  # nothing written


def test_ranges_convert_to_the_clients_position_encoding(project: Path) -> None:
    proposed = propose_edit({"path": "a.py", "edits": [edit((0, 4), (0, 7), "x")]},
                            Workspace([project]))
    assert proposed.ranges("utf-16") == [(Position(0, 4), Position(0, 7))]
    assert proposed.ranges("utf-8") == [(Position(0, 5), Position(0, 10))]
    assert proposed.ranges("utf-32") == [(Position(0, 4), Position(0, 6))]


def test_touching_ranges_and_inserts_at_one_point_are_allowed(project: Path) -> None:
    proposed = propose_edit(
        {"path": "a.py", "edits": [edit((1, 0), (1, 6), "A"), edit((1, 6), (1, 11), "B"),
                                   edit((2, 0), (2, 0), "x"), edit((2, 0), (2, 0), "y")]},
        Workspace([project]))
    assert [e.new_text for e in proposed.edits] == ["A", "B", "x", "y"]  # the order given


def test_overlapping_ranges_are_refused(project: Path) -> None:
    assert refused(project, [edit((1, 0), (1, 6), "A"), edit((0, 0), (0, 1), "B"),
                             edit((1, 3), (1, 3), "C")]) == (
        "edits[0] (line 1, character 0)-(line 1, character 6) and edits[2] (line 1, "
        "character 3)-(line 1, character 3) overlap; merge them into one edit")


def test_positions_past_a_line_or_the_file_are_refused(project: Path) -> None:
    assert refused(project, [edit((0, 0), (0, 9), "x")]) == (
        "edits[0].range: position (line 0, character 9) is past the end of line 0, which is 8 "
        "utf-16 code units long (valid characters: 0-8)")
    assert refused(project, [edit((0, 0), (0, 1), ""), edit((3, 0), (3, 0), "x")]) == (
        "edits[1].range: position (line 3, character 0): line 3 does not exist: the document "
        "has 3 lines (0-2)")


def test_a_position_inside_a_surrogate_pair_is_refused(project: Path) -> None:
    assert refused(project, [edit((0, 6), (0, 6), "x")]) == (
        "edits[0].range: position (line 0, character 6) falls inside a surrogate pair: '😀' "
        "starts at utf-16 code unit 5 and takes 2")


def test_a_range_that_ends_before_it_starts_is_refused(project: Path) -> None:
    assert refused(project, [edit((1, 4), (1, 2), "x")]) == (
        "edits[0].range: range start (line 1, character 4) comes after its end (line 1, "
        "character 2)")


def test_the_open_documents_text_and_version_are_used(project: Path) -> None:
    unsaved = Document("file:///editor/a.py", "python", 12, "only one line")
    real = (project / "a.py").resolve()
    proposed = propose_edit({"path": "a.py", "edits": [edit((0, 5), (0, 8), "ONE")]},
                            Workspace([project]),
                            lambda path: unsaved if path == real else None)
    assert (proposed.uri, proposed.version, proposed.text) == (
        "file:///editor/a.py", 12, "only one line")
    assert proposed.edits == (TextReplacement(5, 8, "ONE"),)
    # Valid on disk (line 1 exists there), not in the editor's text: refused.
    with pytest.raises(ToolError) as caught:
        propose_edit({"path": "a.py", "edits": [edit((1, 0), (1, 1), "x")]},
                     Workspace([project]), lambda path: unsaved)
    assert str(caught.value).startswith("edits[0].range: position (line 1, character 0): line 1 "
                                        "does not exist")


def test_files_that_cannot_be_edited_are_refused(project: Path) -> None:
    (project / "latin1.txt").write_bytes(b"caf\xe9\n")
    (project / "blob.bin").write_bytes(b"\x00\x01")
    (project / ".env").write_text("A=1\n")
    insert = [edit((0, 0), (0, 0), "x")]
    assert refused(project, insert, "new.py") == (
        'path "new.py" does not exist (propose_edit changes existing files)')
    assert refused(project, insert, "latin1.txt") == (
        'path "latin1.txt" is not UTF-8 text; open it in the editor first')
    assert refused(project, insert, "blob.bin") == 'path "blob.bin" is a binary file, not text'
    assert refused(project, insert, ".env") == (
        "path \".env\" matches the secret-file pattern '.env*': tools never read secrets")
    assert refused(project, insert, ".git/config") == (
        'path ".git/config" is inside a .git directory: git internals are not open to tools')


def test_positions_beyond_lsp_integers_are_schema_errors(project: Path) -> None:
    result = asyncio.run(run_tool(
        "propose_edit", {"path": "a.py", "edits": [edit((2**40, 0), (2**40, 0), "x")]},
        Workspace([project]), timeout_s=5.0, output_chars=1000))
    assert (result.content, result.is_error) == (
        "propose_edit: invalid arguments: edits[0].range.end.line: 1099511627776 is greater "
        "than the maximum of 2147483647; edits[0].range.start.line: 1099511627776 is greater "
        "than the maximum of 2147483647. Expected {path: string, edits: array}", True)


def test_run_tool_returns_the_proposed_edit_with_its_summary(project: Path) -> None:
    result = asyncio.run(run_tool(
        "propose_edit", {"path": "a.py", "edits": [edit((1, 0), (1, 6), "2nd")]},
        Workspace([project]), timeout_s=5.0, output_chars=1000))
    assert (result.content, result.is_error) == (
        "proposed 1 edit to a.py; the user reviews them in the editor", False)
    assert result.edit is not None and result.edit.edits == (TextReplacement(8, 14, "2nd"),)
    assert (project / "a.py").read_text(encoding="utf-8") == TEXT
