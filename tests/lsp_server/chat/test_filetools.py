"""read_file, list_files and search_text: what the model reads, and every refusal and bound."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lsp_server.chat import filetools
from lsp_server.chat.filetools import (
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_MATCHES,
    list_files,
    pattern_size,
    search_text,
    split_lines,
)
from lsp_server.chat.sandbox import Workspace
from lsp_server.chat.tools import ToolResult, run_tool
from lsp_server.documents import Document


def write(path: Path, content: str | bytes = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, newline="")
    return path


def run(name: str, arguments: dict[str, Any], workspace: Workspace, **options: Any) -> ToolResult:
    return asyncio.run(run_tool(name, arguments, workspace, timeout_s=10.0, output_chars=20_000,
                                **options))


def ok(name: str, arguments: dict[str, Any], workspace: Workspace, **options: Any) -> str:
    result = run(name, arguments, workspace, **options)
    assert not result.is_error, result.content
    return result.content


def error(name: str, arguments: dict[str, Any], workspace: Workspace) -> str:
    result = run(name, arguments, workspace)
    assert result.is_error, result.content
    return result.content


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write(root / "src" / "app.py", "import os\n\ndef main():\n    print('hello')\n")
    write(root / "src" / "util.py", "def helper():\n    return 'hello'\n")
    write(root / "README.md", "# Hello\n")
    return root


# --- read_file -------------------------------------------------------------------------------


def test_split_lines_counts_lines_as_editors_do() -> None:
    assert split_lines("") == []
    assert split_lines("a") == ["a"]
    assert split_lines("a\n") == ["a"]
    assert split_lines("a\n\n") == ["a", ""]
    assert split_lines("a\r\nb\rc\nd\fe\u2028f") == ["a", "b", "c", "d\fe\u2028f"]


def test_read_file_numbers_each_line(project: Path) -> None:
    assert ok("read_file", {"path": "src/app.py"}, Workspace([project])) == (
        "src/app.py (4 lines)\n1\timport os\n2\t\n3\tdef main():\n4\t    print('hello')")


def test_read_file_reads_a_line_range_with_aligned_numbers(project: Path) -> None:
    write(project / "long.txt", "".join(f"line {i}\n" for i in range(1, 13)))
    workspace = Workspace([project])
    assert ok("read_file", {"path": "long.txt", "startLine": 9, "endLine": 11}, workspace) == (
        "long.txt (lines 9-11 of 12)\n 9\tline 9\n10\tline 10\n11\tline 11")
    assert ok("read_file", {"path": "long.txt", "startLine": 12, "endLine": 400}, workspace) == (
        "long.txt (lines 12-12 of 12)\n12\tline 12")
    assert ok("read_file", {"path": "long.txt", "startLine": 11.0}, workspace) == (
        "long.txt (lines 11-12 of 12)\n11\tline 11\n12\tline 12")


def test_read_file_refuses_a_range_outside_the_file(project: Path) -> None:
    workspace = Workspace([project])
    assert error("read_file", {"path": "src/app.py", "startLine": 5}, workspace) == (
        "startLine 5 is past the end of src/app.py, which has 4 lines")
    assert error("read_file", {"path": "src/app.py", "startLine": 3, "endLine": 2},
                 workspace) == "endLine 2 comes before startLine 3"


def test_read_file_keeps_lsp_line_breaks_strips_a_bom_and_replaces_bad_bytes(
        project: Path) -> None:
    write(project / "mixed.txt", b"\xef\xbb\xbfa\r\nb\rc\fd\n\xff\n")
    assert ok("read_file", {"path": "mixed.txt"}, Workspace([project])) == (
        "mixed.txt (4 lines)\n1\ta\n2\tb\n3\tc\fd\n4\t\ufffd")


def test_read_file_of_an_empty_file(project: Path) -> None:
    write(project / "empty.txt", "")
    assert ok("read_file", {"path": "empty.txt"}, Workspace([project])) == "empty.txt (empty file)"


def test_read_file_shows_the_editor_text_of_an_open_document(project: Path) -> None:
    unsaved = Document("file:///x", "python", 7, "edited in the editor\n")
    opened = (project / "src" / "app.py").resolve()
    content = ok("read_file", {"path": "src/app.py"}, Workspace([project]),
                 open_document=lambda path: unsaved if path == opened else None)
    assert content == "src/app.py (1 line)\n1\tedited in the editor"


def test_read_file_refuses_binary_files(project: Path) -> None:
    write(project / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert error("read_file", {"path": "logo.png"}, Workspace([project])) == (
        'path "logo.png" is a binary file, not text')


def test_read_file_refuses_files_over_the_size_bound(project: Path) -> None:
    write(project / "big.log", b"x" * (3 * MAX_FILE_BYTES))
    assert error("read_file", {"path": "big.log"}, Workspace([project])) == (
        'path "big.log" is 3.0 MiB, more than the 1.0 MiB read_file reads; find what you need '
        "in it with search_text")


def test_read_file_of_missing_files_directories_and_fifos(project: Path) -> None:
    os.mkfifo(project / "pipe")
    workspace = Workspace([project])
    assert error("read_file", {"path": "nope.py"}, workspace) == 'path "nope.py" does not exist'
    assert error("read_file", {"path": "src"}, workspace) == (
        'path "src" is a directory; list it with list_files')
    assert error("read_file", {"path": "pipe"}, workspace) == 'path "pipe" is not a regular file'


def test_read_file_refuses_secrets(project: Path) -> None:
    write(project / ".env", "TOKEN=secret\n")
    content = error("read_file", {"path": ".env"}, Workspace([project]))
    assert content == ("path \".env\" matches the secret-file pattern '.env*': tools never read "
                       "secrets")
    assert "TOKEN" not in content


# --- list_files ------------------------------------------------------------------------------


def test_list_files_lists_the_tree_with_directories_marked(project: Path) -> None:
    write(project / ".gitignore", "build/\n")
    write(project / "build" / "out.js")
    write(project / ".git" / "HEAD")
    write(project / ".env")
    assert ok("list_files", {}, Workspace([project])) == (
        ".gitignore\nREADME.md\nsrc/\nsrc/app.py\nsrc/util.py")


def test_list_files_of_a_subdirectory_gives_paths_from_the_workspace_root(project: Path) -> None:
    assert ok("list_files", {"path": "src"}, Workspace([project])) == "src/app.py\nsrc/util.py"


def test_list_files_with_a_glob(project: Path) -> None:
    write(project / "tests" / "test_app.py")
    workspace = Workspace([project])
    assert ok("list_files", {"glob": "*.py"}, workspace) == (
        "src/app.py\nsrc/util.py\ntests/test_app.py")
    assert ok("list_files", {"glob": "tests/**"}, workspace) == "tests/\ntests/test_app.py"
    assert ok("list_files", {"path": "src", "glob": "u*"}, workspace) == "src/util.py"
    assert ok("list_files", {"glob": "*.rs"}, workspace) == 'no entries match glob "*.rs" in .'
    assert error("list_files", {"glob": "!*.py"}, workspace) == (
        "glob \"!*.py\" cannot start with '!'")


def test_list_files_refuses_files_and_missing_paths(project: Path) -> None:
    workspace = Workspace([project])
    assert error("list_files", {"path": "README.md"}, workspace) == (
        'path "README.md" is a file, not a directory; read it with read_file')
    assert error("list_files", {"path": "nope"}, workspace) == 'path "nope" does not exist'
    (project / "empty").mkdir()
    assert ok("list_files", {"path": "empty"}, workspace) == "empty is empty"


def test_list_files_stops_at_its_entry_bound(project: Path) -> None:
    for i in range(MAX_ENTRIES + 100):
        write(project / "many" / f"f{i:04}.txt", "")
    lines = ok("list_files", {"path": "many"}, Workspace([project])).split("\n")
    assert len(lines) == MAX_ENTRIES + 1
    assert lines[0] == "many/f0000.txt" and lines[-2] == f"many/f{MAX_ENTRIES - 1:04}.txt"
    assert lines[-1] == f"[stopped at {MAX_ENTRIES} entries: list a subdirectory or use a glob]"


def test_list_files_past_its_deadline_says_it_is_incomplete(project: Path) -> None:
    assert list_files({}, Workspace([project]), time.monotonic() - 1) == (
        "[the listing ran out of time; it is incomplete]")


# --- search_text -----------------------------------------------------------------------------


def test_search_text_finds_literal_lines_case_sensitively(project: Path) -> None:
    workspace = Workspace([project])
    assert ok("search_text", {"query": "hello"}, workspace) == (
        "src/app.py:4:     print('hello')\nsrc/util.py:2:     return 'hello'")
    assert ok("search_text", {"query": "Hello"}, workspace) == "README.md:1: # Hello"


def test_search_text_with_a_regular_expression(project: Path) -> None:
    workspace = Workspace([project])
    assert ok("search_text", {"query": r"def \w+\(", "regex": True}, workspace) == (
        "src/app.py:3: def main():\nsrc/util.py:1: def helper():")
    assert ok("search_text", {"query": "(?i)^# hello$", "regex": True}, workspace) == (
        "README.md:1: # Hello")


def test_search_text_in_one_file_or_directory(project: Path) -> None:
    workspace = Workspace([project])
    assert ok("search_text", {"query": "hello", "path": "src/util.py"}, workspace) == (
        "src/util.py:2:     return 'hello'")
    assert ok("search_text", {"query": "zzz", "path": "src"}, workspace) == (
        'no matches for "zzz" in src (2 files searched)')


def test_search_text_honours_gitignore_and_skips_denied_files(project: Path) -> None:
    write(project / ".gitignore", "dist/\n")
    write(project / "dist" / "bundle.js", "hello\n")
    write(project / ".env", "hello=secret\n")
    write(project / "data.sqlite", "hello\n")
    write(project / ".git" / "config", "hello\n")
    assert ok("search_text", {"query": "hello"}, Workspace([project], denied=["*.sqlite"])) == (
        "src/app.py:4:     print('hello')\nsrc/util.py:2:     return 'hello'")


def test_search_text_skips_binary_and_huge_files_and_says_so(project: Path) -> None:
    write(project / "blob.bin", b"hello\x00\x01")
    write(project / "huge.txt", b"hello\n" * (MAX_FILE_BYTES // 6 + 1))
    assert ok("search_text", {"query": "hello", "path": "."}, Workspace([project])) == (
        "src/app.py:4:     print('hello')\nsrc/util.py:2:     return 'hello'\n"
        "[skipped files: 1 binary, 1 over 1.0 MiB]")


def test_search_text_cuts_long_lines_around_the_match(project: Path) -> None:
    write(project / "min.js", "a" * 1000 + "NEEDLE" + "b" * 1000 + "\n")
    content = ok("search_text", {"query": "NEEDLE"}, Workspace([project]))
    assert content == "min.js:1: …" + "a" * 50 + "NEEDLE" + "b" * 144 + "…"


def test_search_text_stops_at_its_match_bound(project: Path) -> None:
    write(project / "many.txt", "hit\n" * (MAX_MATCHES + 50))
    lines = ok("search_text", {"query": "hit", "path": "many.txt"}, Workspace([project])).split(
        "\n")
    assert len(lines) == MAX_MATCHES + 1
    assert lines[-2] == f"many.txt:{MAX_MATCHES}: hit"
    assert lines[-1] == f"[stopped at {MAX_MATCHES} matches: narrow the query or the path]"


def test_a_catastrophic_regex_stops_at_the_search_deadline(project: Path) -> None:
    write(project / "aaa.txt", "ok\n" + "a" * 50_000 + "!\n")
    began = time.monotonic()
    content = search_text({"query": "(a+)+$", "regex": True}, Workspace([project]),
                          time.monotonic() + 0.5)
    elapsed = time.monotonic() - began
    assert content == (
        'no matches for "(a+)+$" in . (2 files searched)\n[the search ran out of time on '
        "aaa.txt:2 (a regular expression that backtracks too much?); the results are "
        "incomplete]")
    assert elapsed < 5  # unbounded, this match would take longer than the universe's age


def test_pattern_size_counts_expanded_repetitions() -> None:
    assert pattern_size("abc") == 3
    assert pattern_size(r"\d{3}-\d{4}") == 8
    assert pattern_size("a{10}") == 10
    assert pattern_size("a{2,50}b") == 51
    assert pattern_size("(ab){10}") == 20
    assert pattern_size("(?:a{100}){100}") == 10_100  # "?:" counted as one element: an upper bound
    assert pattern_size("[a-z{}]{5}") == 5
    assert pattern_size("x{a}") == 4  # not a count: literal characters
    assert pattern_size("((a)") == 1  # unbalanced: the compiler will say so


def test_a_regex_too_large_to_compile_quickly_is_refused(project: Path) -> None:
    began = time.monotonic()
    assert error("search_text", {"query": "(?:a{1000}){1000}", "regex": True},
                 Workspace([project])) == (
        "the regular expression is too large once its counted repetitions are expanded "
        "(~1001000 elements; at most 2000): use smaller {n,m} counts")
    assert time.monotonic() - began < 5  # compiling it takes ~30 s and 240 MB


def test_an_invalid_regex_is_reported(project: Path) -> None:
    assert error("search_text", {"query": "(unclosed", "regex": True}, Workspace([project])) == (
        'invalid regular expression "(unclosed": missing ) at position 9')


def test_search_text_past_its_deadline_says_it_is_incomplete(project: Path) -> None:
    assert search_text({"query": "hello"}, Workspace([project]), time.monotonic() - 1) == (
        'no matches for "hello" in . (0 files searched)\n'
        "[the search ran out of time; the results are incomplete]")


def test_search_budget_is_a_share_of_the_time_limit(project: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []

    def record(args: dict[str, Any], workspace: Workspace, deadline: float) -> str:
        seen.append(deadline - time.monotonic())
        return "done"

    monkeypatch.setattr(filetools, "search_text", record)
    assert asyncio.run(run_tool("search_text", {"query": "x"}, Workspace([project]),
                                timeout_s=4.0, output_chars=100)) == ToolResult("done", False)
    assert 1.0 < seen[0] <= 2.0  # half of the 4 s limit, less the time to get there
