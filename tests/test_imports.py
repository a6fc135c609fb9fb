"""Every module of the project imports alone, first: no import circle hides behind the order in
which other modules happen to load, and the engine never pulls in the language server.

One fresh interpreter imports the third-party libraries once, then, for each of our modules,
forgets all of ours and imports that one alone (a circle shows as an ImportError on a partially
initialised module, whichever module of the circle comes first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, json, sys, traceback
import torch, pygls, lsprotocol, mistral_common  # third-party: once, outside the measure
ours = ("engine", "lsp_server")
results = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        results[name] = traceback.format_exc(limit=3)
        continue
    server = sorted(m for m in sys.modules if m.split(".")[0] == "lsp_server")
    results[name] = server if name.startswith("engine") and server else None
print(json.dumps(results))
"""


def modules() -> list[str]:
    names = []
    for package in ("engine", "lsp_server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":
                continue  # running it starts the program
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_each_module_imports_alone_and_the_engine_never_imports_the_server() -> None:
    names = modules()
    assert "engine.runtime.generation" in names and "lsp_server.backends.local" in names
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(done.stdout.splitlines()[-1])
    assert sorted(results) == sorted(names)
    assert {name: problem for name, problem in results.items() if problem} == {}
