"""The repository as a newcomer meets it: the README's two commands, in the README's order, are
what CI runs, and what the first one leaves behind does not break the second."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("engine", "lsp_server", "tests", "benchmarks")  # `make lint`'s arguments


def readme_first_commands() -> list[str]:
    """The commands of the README's first `sh` block, comments dropped."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block is not None
    return [line.split("#")[0].strip() for line in block.group(1).splitlines()
            if line.split("#")[0].strip()]


def test_ci_runs_the_readme_commands_in_the_readme_order() -> None:
    assert readme_first_commands() == ["make demo", "make test"]
    script = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^\s*(?:time\s+)?(make\b[^\n#]*?)\s*$", script, re.MULTILINE)
    assert commands == readme_first_commands()


def test_make_lint_passes_with_the_folders_make_demo_and_make_bench_create(
        tmp_path: Path) -> None:
    """ruff sorts imports by whether a name is a folder at the project's root: once `make demo`
    writes `models/tiny`, a benchmark module named `models` became first-party and `make lint`
    failed (I001). Lint a copy of the tree with those folders present."""
    pytest.importorskip("ruff")
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".ruff_cache",
                                    ".mypy_cache", "node_modules")
    for name in LINTED:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    makefile = (ROOT / "Makefile").read_text()
    created = sorted(set(re.findall(r"(?<![\w/~.])(models/\w+)", makefile)))
    assert created == ["models/bench", "models/tiny"]  # TINY and bench's --model-dir
    for folder in created:
        (tmp_path / folder).mkdir(parents=True)
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *LINTED],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == "All checks passed!\n"


def test_the_login_command_is_the_same_everywhere_and_exists() -> None:
    """README, `tramontane download --help` and the gated-repository error name one command,
    and the installed huggingface_hub has it (it has shipped `hf` since 0.34; the 2.x installed
    here has no `huggingface-cli` at all)."""
    sources = [ROOT / "README.md", ROOT / "engine" / "cli.py",
               ROOT / "engine" / "checkpoints" / "hub.py"]
    named = {path.name: set(re.findall(r"`((?:huggingface-cli|hf)\b[^`]*login)`",
                                       path.read_text())) for path in sources}
    assert named == {path.name: {"hf auth login"} for path in sources}
    hf = Path(sys.executable).parent / "hf"
    run = subprocess.run([str(hf), "auth", "login", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Usage: hf auth login" in run.stdout
