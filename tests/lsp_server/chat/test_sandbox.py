"""The workspace sandbox: every refusal with its exact message, and the walk's skips."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lsp_server.chat.errors import ChatError, DeadlineExceeded, ToolError
from lsp_server.chat.sandbox import SECRET_PATTERNS, Workspace, read_limited, show_path


def write(path: Path, text: str = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/proj (the workspace) beside tmp/outside (what must never be reached)."""
    proj = tmp_path / "proj"
    write(proj / "src" / "app.py", "print('hi')\n")
    write(proj / "README.md")
    write(tmp_path / "outside" / "secret.txt", "outside secret\n")
    return proj


def refusal(workspace: Workspace, path: str) -> str:
    with pytest.raises(ToolError) as caught:
        workspace.resolve(path)
    return str(caught.value)


# --- Allowed paths ---------------------------------------------------------------------------


def test_relative_and_absolute_paths_inside_resolve_to_the_real_file(tree: Path) -> None:
    workspace = Workspace([tree])
    real = (tree / "src" / "app.py").resolve()
    assert workspace.resolve("src/app.py") == real
    assert workspace.resolve("./src/../src/app.py") == real
    assert workspace.resolve(str(tree / "src" / "app.py")) == real
    assert workspace.resolve("") == tree.resolve()
    assert workspace.resolve(".") == tree.resolve()
    assert workspace.resolve("missing/file.py") == tree.resolve() / "missing" / "file.py"


def test_a_symlink_inside_the_workspace_resolves_to_its_target(tree: Path) -> None:
    (tree / "link.py").symlink_to(tree / "src" / "app.py")
    assert Workspace([tree]).resolve("link.py") == (tree / "src" / "app.py").resolve()


def test_a_workspace_folder_reached_through_a_symlink_accepts_both_spellings(tmp_path: Path,
                                                                             tree: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(tree)
    workspace = Workspace([alias])
    real = (tree / "src" / "app.py").resolve()
    assert workspace.resolve(str(alias / "src" / "app.py")) == real
    assert workspace.resolve(str(tree / "src" / "app.py")) == real
    assert workspace.resolve("src/app.py") == real


def test_several_folders_relative_paths_start_at_the_first(tmp_path: Path, tree: Path) -> None:
    other = write(tmp_path / "other" / "lib.py").parent
    workspace = Workspace([tree, other])
    assert workspace.resolve(str(other / "lib.py")) == (other / "lib.py").resolve()
    assert workspace.resolve("../other/lib.py") == (other / "lib.py").resolve()
    assert workspace.display(tree.resolve() / "src" / "app.py") == "src/app.py"
    assert workspace.display(tree.resolve()) == "."
    assert workspace.display(other.resolve() / "lib.py") == (other.resolve() / "lib.py").as_posix()
    assert workspace.folders == (tree.resolve(), other.resolve())


# --- Refusals --------------------------------------------------------------------------------


def test_absolute_paths_outside_are_refused(tmp_path: Path, tree: Path) -> None:
    workspace = Workspace([tree])
    assert refusal(workspace, "/etc/passwd") == (
        'path "/etc/passwd" is outside the workspace folders')
    sneaky = f"{tree}/../outside/secret.txt"
    assert refusal(workspace, sneaky) == f'path "{sneaky}" is outside the workspace folders'


def test_dotdot_escapes_are_refused(tree: Path) -> None:
    workspace = Workspace([tree])
    for path in ("..", "../outside/secret.txt", "src/../../outside/secret.txt", "a/b/../../../x"):
        assert refusal(workspace, path) == (
            f"path \"{path}\": '..' leads outside the workspace folder")


def test_home_directory_paths_are_refused(tree: Path) -> None:
    workspace = Workspace([tree])
    for path in ("~", "~/.ssh/id_rsa", "~root/.bashrc"):
        assert refusal(workspace, path) == (
            f"path \"{path}\": '~' (a home directory) is not allowed; give a path relative to "
            "the workspace folder")


def test_nul_bytes_are_refused_and_shown_escaped(tree: Path) -> None:
    assert refusal(Workspace([tree]), "src/app.py\x00.txt") == (
        'path "src/app.py\\u0000.txt" contains a NUL byte')


def test_symlinks_out_of_the_workspace_are_refused_without_saying_where_they_point(
        tmp_path: Path, tree: Path) -> None:
    (tree / "out_link").symlink_to(tmp_path / "outside" / "secret.txt")
    (tree / "outdir").symlink_to(tmp_path / "outside")
    (tree / "src" / "up").symlink_to("../..")
    workspace = Workspace([tree])
    for path in ("out_link", "outdir", "outdir/secret.txt", "src/up/outside/secret.txt",
                 str(tree / "out_link")):
        message = refusal(workspace, path)
        assert message == (f'path "{path}" is a symbolic link, or goes through one, that '
                           "points outside the workspace")
        assert str(tmp_path / "outside") not in message
    # `..` after a link goes up from the link's target, as the OS does it.
    (tree / "src" / "deep").symlink_to(tmp_path / "outside")
    assert refusal(workspace, "src/deep/../outside/secret.txt").startswith(
        'path "src/deep/../outside/secret.txt" is a symbolic link')


def test_symlink_loops_are_refused(tree: Path) -> None:
    (tree / "loop").symlink_to(tree / "loop")
    assert refusal(Workspace([tree]), "loop/x") == (
        'path "loop/x" cannot be resolved (a symbolic link loop)')


def test_names_too_long_for_the_os_are_refused_without_the_absolute_path(tree: Path) -> None:
    workspace = Workspace([tree])
    message = refusal(workspace, "a" * 300)
    assert message == f'path "{"a" * 200}…" cannot be resolved (File name too long)'
    assert workspace.is_denied(Path("b" * 300))


@pytest.mark.parametrize(("path", "pattern"), [
    (".env", ".env*"),
    (".env.local", ".env*"),
    ("config/.envrc", ".env*"),
    (".ENV", ".env*"),
    ("certs/server.pem", "*.pem"),
    ("keys/site.key", "*.key"),
    ("id_rsa", "id_rsa*"),
    ("home/.ssh/id_rsa.pub", "id_rsa*"),
    ("id_dsa", "id_dsa*"),
    ("id_ecdsa", "id_ecdsa*"),
    ("id_ecdsa_sk", "id_ecdsa*"),
    ("id_ed25519", "id_ed25519*"),
])
def test_secret_files_are_refused_by_each_pattern(tree: Path, path: str, pattern: str) -> None:
    assert refusal(Workspace([tree]), path) == (
        f"path \"{path}\" matches the secret-file pattern '{pattern}': tools never read secrets")


def test_every_builtin_secret_pattern_is_tested() -> None:
    assert SECRET_PATTERNS == (".env*", "*.pem", "*.key", "id_rsa*", "id_dsa*", "id_ecdsa*",
                               "id_ed25519*")


def test_links_to_secrets_and_links_named_as_secrets_are_refused(tree: Path) -> None:
    write(tree / ".env", "TOKEN=1\n")
    (tree / "notes.txt").symlink_to(tree / ".env")
    (tree / "server.pem").symlink_to(tree / "src" / "app.py")
    workspace = Workspace([tree])
    assert refusal(workspace, "notes.txt") == (
        "path \"notes.txt\" matches the secret-file pattern '.env*': tools never read secrets")
    assert refusal(workspace, "server.pem") == (
        "path \"server.pem\" matches the secret-file pattern '*.pem': tools never read secrets")


@pytest.mark.parametrize("path", [".git", ".git/config", ".git/objects/ab/cdef", "sub/.git/HEAD",
                                  ".GIT/config"])
def test_git_internals_are_refused(tree: Path, path: str) -> None:
    write(tree / ".git" / "config", "[core]\n")
    assert refusal(Workspace([tree]), path) == (
        f'path "{path}" is inside a .git directory: git internals are not open to tools')


def test_a_directory_named_like_git_is_not_git(tree: Path) -> None:
    write(tree / ".github" / "workflow.yml")
    assert Workspace([tree]).resolve(".github/workflow.yml") == (
        tree / ".github" / "workflow.yml").resolve()


def test_denied_globs_from_the_settings_are_refused(tree: Path) -> None:
    write(tree / "secrets" / "token.txt")
    workspace = Workspace([tree], denied=["*.sqlite", "secrets/", "/local/**"])
    assert refusal(workspace, "data/app.sqlite") == (
        "path \"data/app.sqlite\" matches '*.sqlite' in chat.deniedPaths")
    assert refusal(workspace, "secrets/token.txt") == (
        "path \"secrets/token.txt\" matches 'secrets/' in chat.deniedPaths")
    assert refusal(workspace, "secrets") == (
        "path \"secrets\" matches 'secrets/' in chat.deniedPaths")
    assert refusal(workspace, "local/a/b.txt") == (
        "path \"local/a/b.txt\" matches '/local/**' in chat.deniedPaths")
    # Anchored to the folder: the same name deeper is allowed.
    assert workspace.resolve("src/local/b.txt") == tree.resolve() / "src" / "local" / "b.txt"


def test_denied_globs_cannot_re_allow_a_builtin_secret(tree: Path) -> None:
    assert refusal(Workspace([tree], denied=["!.env"]), ".env").endswith(
        "matches the secret-file pattern '.env*': tools never read secrets")


def test_an_invalid_denied_glob_fails_closed(tree: Path) -> None:
    with pytest.raises(ChatError) as caught:
        Workspace([tree], denied=["*.sqlite", "!"])
    assert str(caught.value) == 'chat.deniedPaths: "!" is not a valid gitignore-style pattern'


def test_no_workspace_folder_refuses_everything() -> None:
    assert refusal(Workspace([]), "a.py") == (
        "no workspace folder is open, so tools cannot reach any file")


def test_is_denied_covers_every_refusal_and_never_raises(tmp_path: Path, tree: Path) -> None:
    (tree / "out_link").symlink_to(tmp_path / "outside" / "secret.txt")
    workspace = Workspace([tree], denied=["*.log"])
    for path in (tree / ".env", tree / "out_link", tree / ".git" / "HEAD", tree / "x.log",
                 tmp_path / "outside" / "secret.txt", Path("../outside"), Path("~")):
        assert workspace.is_denied(path), path
    assert not workspace.is_denied(tree / "src" / "app.py")
    assert not workspace.is_denied(Path("src/app.py"))


def test_long_paths_are_cut_in_messages() -> None:
    assert show_path("a" * 300) == '"' + "a" * 200 + '…"'


# --- The walk ----------------------------------------------------------------------------------


def listing(workspace: Workspace, start: Path) -> list[str]:
    return [workspace.display(e.path) + ("/" if e.is_dir else "")
            for e in workspace.walk(start.resolve())]


def test_the_walk_skips_git_secrets_denied_and_ignored_files(tmp_path: Path, tree: Path) -> None:
    write(tree / ".git" / "config")
    write(tree / ".env")
    write(tree / "keys" / "id_ed25519")
    write(tree / "data.sqlite")
    write(tree / ".gitignore", "build/\n*.log\n!keep.log\n# a comment\n\n!\n")
    write(tree / "build" / "out.js")
    write(tree / "debug.log")
    write(tree / "logs" / "keep.log")
    write(tree / "src" / ".gitignore", "generated.py\n")
    write(tree / "src" / "generated.py")
    write(tree / "other" / "generated.py")  # the nested rule applies only under src/
    (tree / "src" / "alias.py").symlink_to(tree / "src" / "app.py")
    (tree / "linked_dir").symlink_to(tree / "src")  # listed, not entered
    (tree / "out_link").symlink_to(tmp_path / "outside" / "secret.txt")
    (tree / "to_secret").symlink_to(tree / ".env")
    (tree / "dangling").symlink_to(tree / "nothing")
    os.mkfifo(tree / "pipe")
    workspace = Workspace([tree], denied=["*.sqlite"])
    assert listing(workspace, tree) == [
        ".gitignore", "README.md", "keys/", "linked_dir/", "logs/", "logs/keep.log",
        "other/", "other/generated.py", "src/", "src/.gitignore", "src/alias.py", "src/app.py",
    ]


def test_a_deeper_gitignore_can_re_include_what_a_shallower_one_ignores(tree: Path) -> None:
    write(tree / ".gitignore", "*.txt\n")
    write(tree / "docs" / ".gitignore", "!important.txt\n")
    write(tree / "docs" / "important.txt")
    write(tree / "docs" / "other.txt")
    assert listing(Workspace([tree]), tree / "docs") == ["docs/.gitignore", "docs/important.txt"]


def test_walking_a_subdirectory_applies_the_gitignore_files_above_it(tree: Path) -> None:
    write(tree / ".gitignore", "*.tmp\n")
    write(tree / "src" / "a.tmp")
    assert listing(Workspace([tree]), tree / "src") == ["src/app.py"]


def test_an_ignored_directory_named_explicitly_is_walked(tree: Path) -> None:
    write(tree / ".gitignore", "build/\n")
    write(tree / "build" / "out.js")
    write(tree / "build" / "sub" / "x.js")
    assert listing(Workspace([tree]), tree / "build") == ["build/out.js", "build/sub/",
                                                           "build/sub/x.js"]


def test_the_walk_stops_at_its_deadline(tree: Path) -> None:
    with pytest.raises(DeadlineExceeded):
        list(Workspace([tree]).walk(tree.resolve(), deadline=time.monotonic() - 1))


# --- Reading ---------------------------------------------------------------------------------


def test_read_limited_reads_regular_files_up_to_one_byte_past_the_limit(tree: Path) -> None:
    path = write(tree / "ten.txt", "0123456789")
    assert read_limited(path, 100) == b"0123456789"
    assert read_limited(path, 4) == b"01234"


def test_read_limited_neither_blocks_on_a_fifo_nor_follows_a_link(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    assert read_limited(tree / "pipe", 100) is None  # would block forever without O_NONBLOCK
    (tree / "link").symlink_to(tree / "README.md")
    with pytest.raises(OSError):
        read_limited(tree / "link", 100)
