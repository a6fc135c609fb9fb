"""The workspace sandbox: which paths the chat's tools may touch, and how they walk folders.

Every path argument goes through `Workspace.resolve`: relative paths are relative to the first
workspace folder, absolute ones must name a place inside one. Refusals, checked in this order,
each a `ToolError` naming the path as the model gave it and nothing else (never where a link
points, never what lies outside):

1. a NUL byte (the OS would cut the path there);
2. `~` at the start (a home directory: tools take workspace paths, and `Path` never expands it);
3. an absolute path outside every folder, or a relative one whose `..` climbs out
   (judged lexically, so the message says which mistake it was);
4. a path inside lexically that resolves outside: a symlink (or a `..` after one) leads out;
5. `.git` internals: `.git` itself and anything under a `.git` directory;
6. a secret file (the built-in list below), on the path as given or on the resolved one (a link
   named `.env` is refused even if it points at a harmless file; a link to `.env` even if it is
   named `notes.txt`);
7. a match of `chat.deniedPaths` (gitignore-style globs relative to the folder), also on both.

Built-in secret patterns (gitignore-style, so without a slash they match at any depth), matched
case-insensitively: macOS and Windows file systems are, and on Linux `.ENV` is another file but
just as likely a secret.
- `.env*`: dotenv files (`.env`, `.env.local`, `.envrc`).
- `*.pem`, `*.key`: TLS and other private keys.
- `id_rsa*`, `id_dsa*`, `id_ecdsa*`, `id_ed25519*`: OpenSSH's private key names (their `.pub`
  halves are caught too, harmless). `id_rsa` alone would miss today's usual key: ssh-keygen
  makes ed25519 keys by default since OpenSSH 9.5, ecdsa ones are common on hardware tokens
  (`id_ecdsa_sk`), and old setups still keep dsa keys.
Users add their own (`*.sqlite`, `secrets/**`) through `chat.deniedPaths`.

The walk behind list_files and search_text (`Workspace.walk`) never enters a symlinked
directory: it lists it and goes no further (no cycles, no duplicates, nothing outside). A
symlinked file is listed only if it resolves inside the workspace to a file that is not
denied. Denied files, `.git` and files ignored by `.gitignore` files (the folder's and every
directory's down to the entry, deeper ones first, `!` re-including as in git) are skipped
silently. Git's other sources of ignores (`.git/info/exclude`, `core.excludesFile`) are not
read. A directory the model names explicitly is walked even if it is ignored (it asked for it):
the rules from above it do not apply then, its own .gitignore files do.

Nothing here guards against a path swapped for a symlink between the check and the use: no
tool writes, and files are opened with O_NOFOLLOW (`read_limited`), so such a swap makes the
open fail instead of reading through the link.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pathspec import GitIgnoreSpec
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

from .errors import ChatError, DeadlineExceeded, ToolError

SECRET_PATTERNS = (".env*", "*.pem", "*.key", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*")
GITIGNORE_MAX_BYTES = 1 << 20  # a larger .gitignore is not read (its rules do not apply)
_SHOWN_PATH_CHARS = 200


def show_path(path: str) -> str:
    """`path` quoted for a message: JSON-escaped (a NUL shows as \\u0000), long ones cut."""
    if len(path) > _SHOWN_PATH_CHARS:
        path = path[:_SHOWN_PATH_CHARS] + "…"
    return json.dumps(path, ensure_ascii=False)


def _spec(patterns: Sequence[str]) -> tuple[GitIgnoreSpec, tuple[str, ...]]:
    """A spec of the patterns git would accept (others are skipped, as git skips them), and the
    patterns it holds, so that a match's index names its pattern."""
    compiled, kept = [], []
    for line in patterns:
        try:
            pattern = GitIgnoreSpecPattern(line)
        except ValueError:
            continue
        if pattern.include is not None:  # None: a blank line or a comment
            compiled.append(pattern)
            kept.append(line)
    return GitIgnoreSpec(compiled), tuple(kept)


def _match(spec: GitIgnoreSpec, patterns: tuple[str, ...], rel: str) -> str | None:
    """The pattern that excludes `rel` (posix, relative, a trailing "/" for a directory)."""
    result = spec.check_file(rel)
    if result.include and result.index is not None:
        return patterns[result.index]
    return None


def read_limited(path: Path, limit: int) -> bytes | None:
    """Up to `limit` + 1 bytes of the regular file `path`; None if it is not one (a FIFO would
    block an open forever, a device never end). O_NOFOLLOW: `path` is already resolved, so a
    link found here was swapped in after the check; O_NONBLOCK: opening a FIFO returns at once.
    Raises OSError (missing, unreadable)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Folder:
    lexical: Path  # as the client named it, absolute and normalised
    real: Path  # symlinks resolved

    def holds(self, path: Path) -> bool:
        return path.is_relative_to(self.real) or path.is_relative_to(self.lexical)


@dataclass(frozen=True)
class Entry:
    """One file or directory found by `Workspace.walk`."""

    path: Path  # absolute, inside the workspace (a symlink's own path, not its target)
    is_dir: bool


class Workspace:
    def __init__(self, folders: Sequence[Path], denied: Sequence[str] = ()) -> None:
        """Raises ChatError for a `denied` pattern git would not accept: the list guards
        secrets, so a typo must not silently let through what it meant to deny."""
        self._folders = tuple(
            _Folder(Path(os.path.abspath(folder)), Path(folder).resolve()) for folder in folders
        )
        self._secrets, self._secret_patterns = _spec(SECRET_PATTERNS)
        self._denied, self._denied_patterns = _spec(denied)
        dropped = [p for p in denied if p not in self._denied_patterns and p.strip()
                   and not p.lstrip().startswith("#")]
        if dropped:
            raise ChatError(f"chat.deniedPaths: {show_path(dropped[0])} is not a valid "
                            "gitignore-style pattern")

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders, symlinks resolved; the first one is where relative paths start."""
        return tuple(folder.real for folder in self._folders)

    def resolve(self, path: str) -> Path:
        """The real path (symlinks resolved) that tool argument `path` names; ToolError when
        the sandbox refuses it. The path need not exist (the tools say so)."""
        shown = show_path(path)
        if "\x00" in path:
            raise ToolError(f"path {shown} contains a NUL byte")
        if not self._folders:
            raise ToolError("no workspace folder is open, so tools cannot reach any file")
        if path.startswith("~"):
            raise ToolError(f"path {shown}: '~' (a home directory) is not allowed; give a path "
                            "relative to the workspace folder")
        given = Path(path)
        joined = given if given.is_absolute() else self._folders[0].lexical / given
        lexical = Path(os.path.normpath(joined))
        if not any(folder.holds(lexical) for folder in self._folders):
            if given.is_absolute():
                raise ToolError(f"path {shown} is outside the workspace folders")
            raise ToolError(f"path {shown}: '..' leads outside the workspace folder")
        try:
            real = joined.resolve()
            folder = self._folder_of(real)
            is_dir = folder is not None and real.is_dir()
        except RuntimeError:  # a symlink loop, before Python 3.13
            raise ToolError(f"path {shown} cannot be resolved (a symbolic link loop)") from None
        except OSError as e:  # a loop (3.13+), a name too long, ...: strerror names no path
            reason = "a symbolic link loop" if e.errno == errno.ELOOP else e.strerror
            raise ToolError(f"path {shown} cannot be resolved ({reason})") from None
        if folder is None:
            raise ToolError(f"path {shown} is a symbolic link, or goes through one, that "
                            "points outside the workspace")
        for candidate, holder in ((lexical, self._folder_of(lexical)), (real, folder)):
            if holder is None:
                continue
            reason = self._denied_reason(self._relative(candidate, holder), is_dir)
            if reason is not None:
                raise ToolError(f"path {shown} {reason}")
        return real

    def is_denied(self, path: Path) -> bool:
        """Whether a listing or a search must skip `path` (absolute, or relative to the first
        folder): outside the workspace once resolved, `.git` internals, a secret or denied
        file, by its own name or by its target's. Never raises."""
        try:
            self.resolve(str(path))
        except ToolError:
            return True
        return False

    def display(self, path: Path) -> str:
        """`path` as tools show it: relative to the first folder (posix) when inside it,
        absolute otherwise (another workspace folder)."""
        first = self._folders[0] if self._folders else None
        if first is not None:
            for root in (first.real, first.lexical):
                if path.is_relative_to(root):
                    return path.relative_to(root).as_posix() or "."
        return path.as_posix()

    def walk(self, start: Path, *, deadline: float | None = None) -> Iterator[Entry]:
        """Entries under directory `start` (a path `resolve` returned), depth first, each
        directory's entries sorted by name; see the module docstring for what is skipped.
        Raises DeadlineExceeded once `time.monotonic()` passes `deadline`."""
        folder = self._folder_of(start)
        if folder is None:
            return
        chain = [d for d in (start, *start.parents) if d.is_relative_to(folder.real)][::-1]
        ignores: list[tuple[Path, GitIgnoreSpec]] = []
        for depth, directory in enumerate(chain):
            if depth and self._ignored(directory, True, ignores):
                # Named explicitly: the rules from above it do not apply.
                spec = self._gitignore(start)
                ignores = [(start, spec)] if spec is not None else []
                break
            spec = self._gitignore(directory)
            if spec is not None:
                ignores.append((directory, spec))
        yield from self._walk(folder, start, ignores, deadline)

    def _walk(self, folder: _Folder, directory: Path, ignores: list[tuple[Path, GitIgnoreSpec]],
              deadline: float | None) -> Iterator[Entry]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable, or removed meanwhile: nothing to list there
            return
        for entry in entries:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded()
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    found = self._linked(path)
                    if found is not None:
                        yield found
                    continue
                is_dir = entry.is_dir(follow_symlinks=False)
                if not is_dir and not entry.is_file(follow_symlinks=False):
                    continue  # FIFOs, sockets, devices
            except OSError:
                continue
            rel = self._relative(path, folder)
            if self._denied_reason(rel, is_dir) is not None or self._ignored(path, is_dir,
                                                                               ignores):
                continue
            yield Entry(path, is_dir)
            if is_dir:
                spec = self._gitignore(path)
                inner = [*ignores, (path, spec)] if spec is not None else ignores
                yield from self._walk(folder, path, inner, deadline)

    def _linked(self, path: Path) -> Entry | None:
        """A symlink met by the walk: listed (never entered) if its target is allowed."""
        if self.is_denied(path):
            return None
        try:
            target = path.stat()
        except OSError:  # dangling
            return None
        if stat.S_ISDIR(target.st_mode):
            return Entry(path, True)
        return Entry(path, False) if stat.S_ISREG(target.st_mode) else None

    def _ignored(self, path: Path, is_dir: bool, ignores: list[tuple[Path, GitIgnoreSpec]]) -> bool:
        for base, spec in reversed(ignores):  # the deepest .gitignore that has a say decides
            rel = path.relative_to(base).as_posix() + ("/" if is_dir else "")
            include = spec.check_file(rel).include
            if include is not None:
                return include
        return False

    def _gitignore(self, directory: Path) -> GitIgnoreSpec | None:
        try:
            data = read_limited(directory / ".gitignore", GITIGNORE_MAX_BYTES)
        except OSError:
            return None
        if data is None or len(data) > GITIGNORE_MAX_BYTES:
            return None
        spec, patterns = _spec(data.decode("utf-8", "replace").splitlines())
        return spec if patterns else None

    def _folder_of(self, path: Path) -> _Folder | None:
        """The innermost folder holding `path` (folders may nest)."""
        holders = [f for f in self._folders if f.holds(path)]
        return max(holders, key=lambda f: len(f.real.parts), default=None)

    @staticmethod
    def _relative(path: Path, folder: _Folder) -> str:
        root = folder.real if path.is_relative_to(folder.real) else folder.lexical
        return path.relative_to(root).as_posix()

    def _denied_reason(self, rel: str, is_dir: bool) -> str | None:
        """Why a path (relative to its folder, posix) is refused, or None."""
        if rel == ".":
            return None
        if ".git" in rel.lower().split("/"):
            return "is inside a .git directory: git internals are not open to tools"
        key = rel + ("/" if is_dir else "")
        secret = _match(self._secrets, self._secret_patterns, key.lower())
        if secret is not None:
            return f"matches the secret-file pattern '{secret}': tools never read secrets"
        denied = _match(self._denied, self._denied_patterns, key)
        if denied is not None:
            return f"matches '{denied}' in chat.deniedPaths"
        return None
