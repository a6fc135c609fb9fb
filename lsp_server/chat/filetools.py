"""The reading tools: read_file, list_files, search_text. Plain functions run on a worker thread
by `tools.run_tool`, which validated their arguments; each returns the text the model reads or
raises ToolError.

What the model reads, kept compact (tokens are the cost):
- read_file: a header `path (lines 3-7 of 120)`, then one line per line of the file, its
  1-based number right-aligned to the width of the largest shown, a tab, the text. Numbers,
  because the model refers to lines (startLine/endLine here, 0-based positions in
  propose_edit: line n here is line n - 1 there); a tab, because it cannot be mistaken for
  the file's own text. Lines end only at \\n, \\r\\n and \\r, as LSP counts them.
- list_files: one path per line, relative to the first workspace folder (usable as given in
  the other tools), directories ending with "/", in walk order (sorted within a directory).
- search_text: `path:line: text` per matching line; a long line is cut around its match.
A last line in brackets says when a result is partial and why.

Bounds: files over `MAX_FILE_BYTES` are refused by read_file and skipped by search_text (which
also skips binary files: a NUL byte in their first 8000 bytes, git's test); listings stop at
`MAX_ENTRIES`, searches at `MAX_MATCHES`; walks and searches stop at the `deadline` the caller
passes (returning what they found). Regular expressions use the `regex` package, whose
matching takes a timeout and releases the GIL (stdlib `re` holds the GIL, so a catastrophic
pattern on a worker thread would freeze the event loop too, and cannot be stopped). What
`regex` cannot bound is compiling: its cost grows with the pattern once counted repetitions
are expanded (`(?:a{1000}){1000}` took 30 s and 240 MB here), so patterns are sized first
and refused above `MAX_PATTERN_SIZE` elements (which compile in well under a second).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import regex
from pathspec import GitIgnoreSpec

from ..documents import Document
from .errors import DeadlineExceeded, ToolError
from .sandbox import Workspace, read_limited, show_path

OpenDocument = Callable[[Path], Document | None]
"""The editor's open document for a real path (symlinks resolved), or None."""

MAX_FILE_BYTES = 1 << 20
BINARY_SNIFF_BYTES = 8000
MAX_ENTRIES = 500
MAX_MATCHES = 100
MAX_PATTERN_SIZE = 2000
SHOWN_LINE_CHARS = 200
_LINE_BREAK = re.compile(r"\r\n?|\n")
_QUANTIFIER = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def split_lines(text: str) -> list[str]:
    """The file's lines as an editor counts them: a final line break ends the last line
    rather than starting an empty one; "" has no lines."""
    lines = _LINE_BREAK.split(text)
    if lines[-1] == "":
        lines.pop()
    return lines


def decode(data: bytes) -> str:
    """File bytes as text: UTF-8 (invalid bytes become U+FFFD), without a BOM (editors hide it,
    and LSP positions do not count it)."""
    return data.decode("utf-8", "replace").removeprefix("\ufeff")


def is_binary(data: bytes) -> bool:
    return b"\x00" in data[:BINARY_SNIFF_BYTES]


def size_text(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _read_text(real: Path, given: str) -> str:
    """The text of file `real` (named `given` by the model), or a ToolError saying why not."""
    shown = show_path(given)
    try:
        data = read_limited(real, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ToolError(f"path {shown} does not exist") from None
    except IsADirectoryError:
        raise ToolError(f"path {shown} is a directory; list it with list_files") from None
    except OSError as e:
        raise ToolError(f"path {shown} cannot be read ({e.strerror})") from None
    if data is None:
        if real.is_dir():
            raise ToolError(f"path {shown} is a directory; list it with list_files")
        raise ToolError(f"path {shown} is not a regular file")
    if len(data) > MAX_FILE_BYTES:
        size = os.stat(real).st_size
        raise ToolError(f"path {shown} is {size_text(size)}, more than the "
                        f"{size_text(MAX_FILE_BYTES)} read_file reads; find what you need in it "
                        "with search_text")
    if is_binary(data):
        raise ToolError(f"path {shown} is a binary file, not text")
    return decode(data)


def read_file(args: dict[str, Any], workspace: Workspace,
              open_document: OpenDocument | None = None) -> str:
    """A file the editor has open is read from there (unsaved changes included)."""
    given = args["path"]
    real = workspace.resolve(given)
    document = open_document(real) if open_document is not None else None
    text = document.text if document is not None else _read_text(real, given)
    lines = split_lines(text)
    name = workspace.display(real)
    if not lines:
        return f"{name} (empty file)"
    total = len(lines)
    start, end = int(args.get("startLine", 1)), int(args.get("endLine", total))
    if start > total:
        raise ToolError(f"startLine {start} is past the end of {name}, which has {total} "
                        f"line{'s' if total != 1 else ''}")
    if end < start:
        raise ToolError(f"endLine {end} comes before startLine {start}")
    end = min(end, total)
    counted = f"{total} line{'s' if total != 1 else ''}"
    header = f"{name} ({counted})" if (start, end) == (1, total) else (
        f"{name} (lines {start}-{end} of {total})")
    width = len(str(end))
    body = (f"{n:>{width}}\t{lines[n - 1]}" for n in range(start, end + 1))
    return "\n".join((header, *body))


def _start(workspace: Workspace, given: str) -> Path:
    real = workspace.resolve(given)
    if not real.exists():
        raise ToolError(f"path {show_path(given)} does not exist")
    return real


def list_files(args: dict[str, Any], workspace: Workspace, deadline: float | None) -> str:
    given = args.get("path", ".")
    start = _start(workspace, given)
    if not start.is_dir():
        raise ToolError(f"path {show_path(given)} is a file, not a directory; read it with "
                        "read_file")
    glob = args.get("glob")
    matcher = _glob(glob) if glob is not None else None
    lines: list[str] = []
    note = None
    try:
        for entry in workspace.walk(start, deadline=deadline):
            if matcher is not None:
                rel = entry.path.relative_to(start).as_posix() + ("/" if entry.is_dir else "")
                if not matcher.match_file(rel):
                    continue
            if len(lines) == MAX_ENTRIES:
                note = (f"[stopped at {MAX_ENTRIES} entries: list a subdirectory or use a "
                        "glob]")
                break
            lines.append(workspace.display(entry.path) + ("/" if entry.is_dir else ""))
    except DeadlineExceeded:
        note = "[the listing ran out of time; it is incomplete]"
    if not lines and note is None:
        where = workspace.display(start)
        return (f"no entries match glob {show_path(glob)} in {where}" if glob is not None
                else f"{where} is empty")
    return "\n".join(lines if note is None else [*lines, note])


def _glob(glob: str) -> GitIgnoreSpec:
    if glob.startswith("!"):
        raise ToolError(f"glob {show_path(glob)} cannot start with '!'")
    try:
        return GitIgnoreSpec.from_lines([glob])
    except ValueError:
        raise ToolError(f"glob {show_path(glob)} is not a valid glob") from None


def pattern_size(pattern: str) -> int:
    """How many elements `pattern` has once its counted repetitions are expanded (an upper
    estimate: `{n,m}` counts m copies; escapes and sets count 1, an escape's `{...}` may be
    taken for a count, which only overestimates)."""
    totals, last = [0], [0]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        size = 1
        if c == "\\":
            i += 2
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
        elif c == "(":
            totals.append(0)
            last.append(0)
            i += 1
            continue
        elif c == ")" and len(totals) > 1:
            size = max(totals.pop(), 1)
            last.pop()
            i += 1
        elif c == "{" and (quantifier := _QUANTIFIER.match(pattern, i)):
            low, high = quantifier.group(1), quantifier.group(2)
            copies = max(int(low or 0), int(high or 0) if high is not None else 0)
            totals[-1] += last[-1] * (max(copies, 1) - 1)
            last[-1] *= max(copies, 1)
            i = quantifier.end()
            continue
        elif c in "*+?|":
            i += 1
            continue
        else:
            i += 1
        totals[-1] += size
        last[-1] = size
    return sum(totals)


def _compile(query: str) -> Any:
    size = pattern_size(query)
    if size > MAX_PATTERN_SIZE:
        raise ToolError(f"the regular expression is too large once its counted repetitions are "
                        f"expanded (~{size} elements; at most {MAX_PATTERN_SIZE}): use smaller "
                        "{n,m} counts")
    try:
        return regex.compile(query)
    except regex.error as e:
        raise ToolError(f"invalid regular expression {show_path(query)}: {e}") from None


def _files(workspace: Workspace, start: Path, deadline: float | None) -> Iterator[Path]:
    if start.is_file():
        yield start
        return
    for entry in workspace.walk(start, deadline=deadline):
        if not entry.is_dir:
            yield entry.path


def _shown_line(line: str, column: int) -> str:
    line = line.rstrip()
    if len(line) <= SHOWN_LINE_CHARS:
        return line
    begin = max(0, min(column - SHOWN_LINE_CHARS // 4, len(line) - SHOWN_LINE_CHARS))
    cut = line[begin:begin + SHOWN_LINE_CHARS]
    return ("…" if begin else "") + cut + ("…" if begin + SHOWN_LINE_CHARS < len(line) else "")


def _matches(workspace: Workspace, start: Path, query: str, pattern: Any, deadline: float,
             counts: dict[str, int]) -> Iterator[str]:
    """`path:line: text` for each matching line; DeadlineExceeded when time runs out (its
    message names the line a regular expression was stuck on)."""
    for path in _files(workspace, start, deadline):
        try:
            data = read_limited(path, MAX_FILE_BYTES)
        except OSError:
            continue
        if data is None:
            continue
        if len(data) > MAX_FILE_BYTES:
            counts["large"] += 1
            continue
        if is_binary(data):
            counts["binary"] += 1
            continue
        counts["searched"] += 1
        text = decode(data)
        if pattern is None and query not in text:
            continue
        name = workspace.display(path)
        for number, line in enumerate(split_lines(text), 1):
            if pattern is None:
                column = line.find(query)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded()
                try:
                    match = pattern.search(line, timeout=remaining)
                except TimeoutError:
                    raise DeadlineExceeded(f"{name}:{number}") from None
                column = match.start() if match is not None else -1
            if column >= 0:
                yield f"{name}:{number}: {_shown_line(line, column)}"


def search_text(args: dict[str, Any], workspace: Workspace, deadline: float) -> str:
    query: str = args["query"]
    given = args.get("path", ".")
    start = _start(workspace, given)
    pattern = _compile(query) if args.get("regex", False) else None
    counts = {"searched": 0, "binary": 0, "large": 0}
    found: list[str] = []
    note = None
    try:
        for line in _matches(workspace, start, query, pattern, deadline, counts):
            if len(found) == MAX_MATCHES:
                note = f"[stopped at {MAX_MATCHES} matches: narrow the query or the path]"
                break
            found.append(line)
    except DeadlineExceeded as e:
        stuck = (f" on {e.where} (a regular expression that backtracks too much?)"
                 if e.where else "")
        note = f"[the search ran out of time{stuck}; the results are incomplete]"
    tail = [note] if note is not None else []
    kinds = ((counts["binary"], "binary"), (counts["large"], f"over {size_text(MAX_FILE_BYTES)}"))
    skipped = [f"{count} {what}" for count, what in kinds if count]
    if skipped:
        tail.append(f"[skipped files: {', '.join(skipped)}]")
    if not found:
        searched = counts["searched"]
        return "\n".join([f"no matches for {show_path(query)} in {workspace.display(start)} "
                          f"({searched} file{'s' if searched != 1 else ''} searched)", *tail])
    return "\n".join(found + tail)
