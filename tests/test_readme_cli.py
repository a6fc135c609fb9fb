"""The README's command-line examples run as written: every `sh` block of its "The command line"
section, line by line in one bash, in order, in a clean folder set up as the README says (in the
clone, after `make demo`: `.venv` is this test's environment; `models/tiny` is not there yet).

Each line must exit 0 and print what it promises, compared with the engine's own answer for the
arguments bash actually passed (so an example that sends a backslash and an `n` where it means a
newline is caught). A new example line needs its expectation here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import cli

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## The command line"
TINY = "models/tiny"


def readme_commands() -> list[str]:
    """The lines of the section's `sh` blocks, in order, without blank and comment-only lines."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert blocks, f"no sh block under {SECTION!r}"
    return [line for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def run_script(lines: list[str], cwd: Path, out: Path, env: dict[str, str]) -> None:
    """Run `lines` in one bash (state such as an activated venv carries over), each line's
    stdout, stderr and exit code to out/N.{out,err,rc}."""
    script = [f'{{ {line}\n}} >"{out}/{i}.out" 2>"{out}/{i}.err"; echo $? >"{out}/{i}.rc"'
              for i, line in enumerate(lines)]
    subprocess.run(["bash", "--noprofile", "--norc", "-c", "\n".join(script)], cwd=cwd, env=env,
                   stdin=subprocess.DEVNULL, check=True, timeout=900)


def result(out: Path, i: int) -> tuple[int, str, str]:
    return (int((out / f"{i}.rc").read_text()), (out / f"{i}.out").read_text(),
            (out / f"{i}.err").read_text())


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def engine_text(model: engine.Model, prompt: list[int], max_tokens: int) -> str:
    tokens, _ = engine.generate([prompt], model, max_tokens=max_tokens, temperature=0.0)
    stream = engine.TextStream(model.tokenizer)
    return "".join(stream.push(t) for t in tokens[0]) + stream.flush()


@pytest.mark.slow
def test_the_readme_command_line_examples_run_as_written(tmp_path: Path) -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's examples activate .venv: run the tests from a virtualenv")
    venv = Path(sys.prefix)
    clone, out, argv_out = tmp_path / "clone", tmp_path / "out", tmp_path / "argv"
    for folder in (clone, out, argv_out):
        folder.mkdir()
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    # A newcomer's shell: the venv is not active, no model is configured.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", cli.MODEL_ENV)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != (venv / "bin").resolve())

    lines = readme_commands()
    assert lines[0].split("#")[0].strip() == ". .venv/bin/activate"
    # What bash passes to each `tramontane`: the same lines, the command swapped for a script
    # that prints its arguments as JSON.
    dump = tmp_path / "argv.py"
    dump.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    probes = [re.sub(r"\btramontane\b", f'"{sys.executable}" "{dump}"', line, count=1)
              for line in lines]
    # The lines, then the first example again (as right after `make demo`, which wrote the
    # folder), then the probes.
    run_script([*lines, lines[1], *probes], clone, out, env)

    model: engine.Model | None = None
    for i, line in enumerate(lines):
        code, stdout, stderr = result(out, i)
        assert code == 0, f"README line {line!r} exited {code}: {stderr}"
        assert "Traceback" not in stderr, stderr
        if i == 0:
            assert (stdout, stderr) == ("", "")
            continue
        argv = json.loads(result(out, len(lines) + 1 + i)[1])
        assert not any("\\n" in arg for arg in argv), f"a literal backslash-n in {argv}"
        command = argv[0]
        if command == "make-tiny":
            assert argv[1] == TINY
            assert stdout == f"{TINY}\n"
            assert stderr.splitlines()[0] == ("wrote a tiny dense transformer checkpoint (native "
                                              f"layout, v3 tokenizer) to {TINY}")
            model = engine.load(clone / TINY)
            continue
        assert model is not None, "make-tiny must come first"
        assert argv[1] == TINY
        if command == "complete":
            prefix, suffix = option(argv, "--prefix"), option(argv, "--suffix")
            assert prefix == "def add(a, b):\n    return "
            assert suffix == "\n\nprint(add(1, 2))"
            expected = engine_text(model, cli.fim_prompt(model, prefix, suffix), 64)
            assert expected and stdout == expected
        elif command == "generate":
            assert "--json" in argv
            max_tokens = int(option(argv, "--max-tokens"))
            prompt = cli.text_prompt(model, option(argv, "--prompt"))
            data = json.loads(stdout)
            assert data["prompt_tokens"] == prompt
            assert data["text"] == engine_text(model, prompt, max_tokens)
            assert len(data["tokens"]) == len(data["logprobs"]) <= max_tokens
            assert data["finish_reason"] == ("length" if len(data["tokens"]) == max_tokens
                                             else "stop")
        elif command == "chat":
            assert "--max-tokens" in argv, "a chat with the tiny model must be bounded"
            assert stdout.endswith("\n")
            assert stdout.strip() or "(empty reply: turn dropped)" in stderr
        else:
            pytest.fail(f"README line {line!r}: no expectation in this test")

    # Right after `make demo` (models/tiny exists), the first example works too.
    code, stdout, stderr = result(out, len(lines))
    assert (code, stdout) == (0, f"{TINY}\n"), stderr
    assert stderr.splitlines()[0] == (f"{TINY} already holds a tiny dense transformer checkpoint "
                                      "(native layout, v3 tokenizer): left as it is")
