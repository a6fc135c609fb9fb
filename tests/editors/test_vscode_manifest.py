"""`vsce package` and `vsce publish` (how every VS Code extension is packaged and published) run
the `vscode:prepublish` script of package.json and nothing else before packing: that script must
build the bundle that `main` names, or the .vsix ships without its entry point."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "editors" / "vscode" / "package.json"


def manifest() -> dict[str, object]:
    data: dict[str, object] = json.loads(PACKAGE.read_text())
    return data


def commands(script: str, scripts: dict[str, str]) -> list[list[str]]:
    """The commands a script runs, following `npm run X` into script X (and its `preX`)."""
    out: list[list[str]] = []
    for part in re.split(r"&&|;", scripts[script]):
        words = shlex.split(part)
        if words[:2] == ["npm", "run"]:
            for name in (f"pre{words[2]}", words[2]):
                if name in scripts:
                    out.extend(commands(name, scripts))
        elif words:
            out.append(words)
    return out


def test_vscode_prepublish_builds_the_entry_point() -> None:
    data = manifest()
    scripts = data["scripts"]
    assert isinstance(scripts, dict)
    assert "vscode:prepublish" in scripts
    main = str(data["main"]).removeprefix("./")
    bundles = [c for c in commands("vscode:prepublish", scripts)
               if c[0] == "esbuild" and f"--outfile={main}" in c and "--bundle" in c]
    assert bundles, scripts["vscode:prepublish"]


def test_npm_run_package_leaves_the_build_to_vsce() -> None:
    """`make test-vscode` runs `npm run package` on a tree without dist/: packaging succeeds only
    through vsce's own call of `vscode:prepublish`, as it will for `vsce publish`."""
    scripts = manifest()["scripts"]
    assert isinstance(scripts, dict)
    steps = commands("package", scripts)
    assert [c[:2] for c in steps] == [["vsce", "package"]]
