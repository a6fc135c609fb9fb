"""Time from starting the server to its first completion, with `compile` on.

The server answers `initialize` at once, loads the weights on its engine thread (status
`ready`), serves completions eagerly from then on, and swaps in the compiled decode step when
its background compile ends (status `ready` with `fastDecode: true`). This replays that as an
editor sees it: start the process, initialize, open a file and ask for a completion as soon as
the status says `ready`, then wait for the fast path. Each line printed is seconds since the
process started.

    .venv/bin/python benchmarks/startup.py [--model-dir DIR] [--layout native] [--runs 3]

Without --model-dir it makes the tiny random checkpoint `tramontane make-tiny` makes (the
issue's target: the first completion within 2 s of the weights being loaded). The first run of
a machine compiles cold; later runs find inductor's kernels in its disk cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edit_trace import Client  # the same minimal stdio client

from engine.checkpoints.tiny import make_tiny

TEXT = "def add(a, b):\n    return foo()\n\nprint(add(1, 2))\n"
URI = "file:///startup/a.py"


def wait_for(client: Client, started: float, want: Any, timeout: float) -> float:
    """Seconds since `started` at which a status satisfying `want(params)` arrived."""
    deadline = time.monotonic() + timeout
    while True:
        at, frame = client.notes.get(timeout=max(0.01, deadline - time.monotonic()))
        if frame.get("method") != "tramontane/status":
            continue
        params = frame["params"]
        if params["state"] == "error":
            raise RuntimeError(params["message"])
        if want(params):
            return at - started


def one_run(model: Path) -> dict[str, float]:
    started = time.perf_counter()
    client = Client([sys.executable, "-m", "lsp_server", "--stdio", "--log-level", "WARNING"])
    try:
        msg = client.request("initialize", {
            "processId": None, "rootUri": None, "capabilities": {},
            "initializationOptions": {"model": str(model), "compile": True,
                                      "completion": {"maxTokens": 16,
                                                     "timeBudgetMs": 120000}}})
        reply = client.wait(msg, 120)
        assert reply is not None
        initialized = reply[0] - started
        client.notify("initialized", {})
        ready = wait_for(client, started, lambda p: p["state"] == "ready", 600)
        client.notify("textDocument/didOpen", {"textDocument": {
            "uri": URI, "languageId": "python", "version": 1, "text": TEXT}})
        msg = client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": URI}, "position": {"line": 2, "character": 0},
            "context": {"triggerKind": 2}})
        answer = client.wait(msg, 600)
        assert answer is not None and answer[1]["result"]["items"], "no completion"
        first = answer[0] - started
        fast = wait_for(client, started, lambda p: p.get("fastDecode") is True, 1200)
    finally:
        client.close()
    return {"initialize": initialized, "ready": ready, "first completion": first,
            "fast decode": fast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="checkpoint (default: a tiny one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir or make_tiny(Path(tmp) / "tiny")
        runs = [one_run(model) for _ in range(args.runs)]
    for i, run in enumerate(runs, 1):
        print(f"run {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in run.items()) +
              f"; first completion {run['first completion'] - run['ready']:.2f} s after ready")
    gaps = [r["first completion"] - r["ready"] for r in runs]
    fast = statistics.median(r["fast decode"] for r in runs)
    print(f"first completion after the weights were loaded: median {statistics.median(gaps):.2f}"
          f" s (target <= 2 s); fast path in use after {fast:.1f} s (median)")


if __name__ == "__main__":
    main()
