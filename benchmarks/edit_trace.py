"""Replay a person typing through the real server over stdio, with the prefix cache on and off.

The client does what an editor does: opens a real source file (the standard library's
`textwrap.py`, 491 lines), types a new function into its middle one character at a time
(auto-indented line breaks, a few typos deleted again, a jump to another function and back),
sends `didChange` then `textDocument/inlineCompletion` after every keystroke, and cancels the
request still pending when the next keystroke comes (`$/cancelRequest`, as VS Code does).

The same trace runs twice, once per server (`cache.enabled` false, then true), each in two
phases:

- paced: the first `--paced-keys` keystrokes, each waiting for its reply before the next one:
  latency p50/p95 (request sent to reply received) over every keystroke, comparable between
  the two servers;
- live: the whole trace at typing speed (seeded pauses of 60-250 ms, longer at line ends): the
  share of prompt tokens reused, the tokens computed for requests that were then cancelled, and
  how long the engine ran on after a cancel (from `tramontane/metrics`, which the server sends
  when the engine thread is done with each request).

Peak memory is the server process's VmHWM. The model is decode.py's random ~200M Mistral
(written once to --model-dir); the completions are noise, the timings are real.

    .venv/bin/python benchmarks/edit_trace.py --model-dir /tmp/bench-model [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiled_step_ab import build_kernels, checkout_env  # a baseline checkout's own kernels
from decode import ensure_checkpoints  # the same random model as the decode benchmark

SOURCE = Path(textwrap.__file__)
URI = SOURCE.as_uri()
ANCHOR = "\ndef dedent(text):"  # the new function goes just before this one
NEW_FUNCTION = '''def count_words(text, width=70):
    """Return the number of words on each line of the wrapped text."""
    counts = []
    for line in wrap(text, width):
        counts.append(len(line.split()))
    return counts

'''
JUMP_ANCHOR = "    def _split_chunks(self, text):\n"  # an earlier method, for the jump
JUMP_TEXT = "        # TODO: cache the chunks\n"


@dataclass
class Key:
    """One keystroke: replace text[start:end] with `text`, cursor after it; then pause."""

    start: int
    end: int
    text: str
    pause: float


def build_trace(source: str, seed: int) -> list[Key]:
    rng = random.Random(seed)
    keys: list[Key] = []
    cursor = source.index(ANCHOR) + 1

    def pause(char: str) -> float:
        return rng.uniform(0.4, 1.2) if char == "\n" else rng.uniform(0.06, 0.25)

    def type_text(text: str, at: int, typos: bool) -> int:
        line_start = True
        i = 0
        while i < len(text):
            if line_start and text[i] == " ":  # the editor auto-indents: one keystroke
                j = i
                while j < len(text) and text[j] == " ":
                    j += 1
                keys.append(Key(at, at, text[i:j], pause(" ")))
                at, i, line_start = at + j - i, j, False
                continue
            if typos and text[i].isalpha() and rng.random() < 0.04:
                keys.append(Key(at, at, "q", pause("q")))  # a typo, deleted at once
                keys.append(Key(at, at + 1, "", pause("q")))
            keys.append(Key(at, at, text[i], pause(text[i])))
            line_start = text[i] == "\n"
            at, i = at + 1, i + 1
        return at

    half = NEW_FUNCTION.index("    for line")
    cursor = type_text(NEW_FUNCTION[:half], cursor, typos=True)
    # Jump to an earlier method, add a comment line there, come back and finish.
    jump = source.index(JUMP_ANCHOR) + len(JUMP_ANCHOR)
    type_text(JUMP_TEXT, jump, typos=False)
    cursor += len(JUMP_TEXT)
    type_text(NEW_FUNCTION[half:], cursor, typos=True)
    return keys


def position(text: str, offset: int) -> dict[str, int]:
    """LSP position of `offset` (the trace is ASCII: UTF-16 units = characters)."""
    line = text.count("\n", 0, offset)
    return {"line": line, "character": offset - (text.rfind("\n", 0, offset) + 1)}


class Client:
    """A minimal LSP client over the server's stdio; records when every frame arrived."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=cwd,
                                     env={**os.environ, **env} if env else None)
        self.replies: dict[int, tuple[float, dict[str, Any]]] = {}
        self.notes: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.metrics: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = 0
            while (header := out.readline()) not in (b"\r\n", b""):
                if header.lower().startswith(b"content-length:"):
                    length = int(header.split(b":")[1])
            if not header:
                return
            frame = json.loads(out.read(length))
            now = time.perf_counter()
            if "method" in frame:
                if frame["method"] == "tramontane/metrics":
                    self.metrics.append(frame["params"])
                self.notes.put((now, frame))
            else:
                with self._cond:
                    self.replies[frame["id"]] = (now, frame)
                    self._cond.notify_all()

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        stdin.flush()

    def request(self, method: str, params: Any) -> int:
        self._next += 1
        self.send({"id": self._next, "method": method, "params": params})
        return self._next

    def notify(self, method: str, params: Any) -> None:
        self.send({"method": method, "params": params})

    def wait(self, msg_id: int, timeout: float) -> tuple[float, dict[str, Any]] | None:
        with self._cond:
            self._cond.wait_for(lambda: msg_id in self.replies, timeout)
            return self.replies.get(msg_id)

    def wait_status(self, state: str, timeout: float, **fields: Any) -> None:
        """Until a status of `state` (and carrying `fields`) arrives."""
        deadline = time.monotonic() + timeout
        while True:
            _, frame = self.notes.get(timeout=max(0.01, deadline - time.monotonic()))
            params = frame.get("params", {})
            if frame["method"] == "tramontane/status" and params["state"] == state and \
                    all(params.get(k) == v for k, v in fields.items()):
                return
            if frame["method"] == "tramontane/status" and frame["params"]["state"] == "error":
                raise RuntimeError(frame["params"]["message"])

    def peak_rss_mib(self, field: str = "VmHWM") -> float:
        """The server's peak resident memory (or another /proc status field), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        msg = self.request("shutdown", None)
        self.wait(msg, 30)
        self.notify("exit", None)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)  # answered requests, seconds
    cancelled: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


def replay(client: Client, source: str, keys: list[Key], paced: bool, version: int) -> Phase:
    phase = Phase()
    text = source
    first_metric = len(client.metrics)
    pending: tuple[int, float] | None = None
    for key in keys:
        if pending is not None and not paced:
            msg, sent = pending
            if client.wait(msg, 0) is None:
                client.notify("$/cancelRequest", {"id": msg})
            got = client.wait(msg, 60)
            assert got is not None, "a cancelled request got no reply"
            if "error" in got[1]:
                phase.cancelled += 1
            else:
                phase.latencies.append(got[0] - sent)
        version += 1
        change = {"range": {"start": position(text, key.start), "end": position(text, key.end)},
                  "text": key.text}
        text = text[:key.start] + key.text + text[key.end:]
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": URI, "version": version}, "contentChanges": [change]})
        cursor = key.start + len(key.text)
        sent = time.perf_counter()
        msg = client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": URI}, "position": position(text, cursor),
            "context": {"triggerKind": 2}})
        if paced:
            got = client.wait(msg, 300)
            assert got is not None and "result" in got[1], got
            phase.latencies.append(got[0] - sent)
            time.sleep(0.02)
        else:
            pending = (msg, sent)
            time.sleep(key.pause)
    if pending is not None:
        got = client.wait(pending[0], 300)
        assert got is not None
        phase.latencies.append(got[0] - pending[1])
    time.sleep(1.0)  # the last metrics
    phase.metrics = client.metrics[first_metric:]
    return phase


def start_server(model: Path, options: dict[str, Any], pythonpath: str | None = None,
                 fast: bool = True) -> tuple[Client, float]:
    """A server on `model` with these settings, ready; with `fast`, once its compiled decode
    step is in use (servers from before it compiled in the background were ready only then).
    `pythonpath`: run another checkout's server (a baseline) with this interpreter, from that
    checkout (`-m` puts the working directory first on sys.path: run from this repository,
    the "baseline" imported this checkout's code) and with its own C++ kernels
    (`compiled_step_ab.build_kernels` builds them)."""
    env = checkout_env(Path(pythonpath)) if pythonpath else None
    client = Client([sys.executable, "-m", "lsp_server", "--stdio", "--log-level", "WARNING"],
                    env, cwd=pythonpath)
    client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {},
                                  "initializationOptions": {"model": str(model), **options}})
    client.notify("initialized", {})
    t0 = time.perf_counter()
    client.wait_status("ready", 600)
    load = time.perf_counter() - t0
    if fast:
        client.wait_status("ready", 1200, fastDecode=True)
    return client, load


def run_server(model: Path, cache: bool, source: str, keys: list[Key], paced_keys: int,
               dtype: str, max_tokens: int, pythonpath: str | None = None) -> dict[str, Any]:
    options = {"dtype": dtype, "cache": {"enabled": cache},
               "completion": {"maxTokens": max_tokens, "timeBudgetMs": 120000}}
    client, load = start_server(model, options, pythonpath, fast=pythonpath is None)
    try:
        row: dict[str, Any] = {"cache": cache, "load_seconds": load}
        for name, trace, paced in (("paced", keys[:paced_keys], True), ("live", keys, False)):
            client.notify("textDocument/didOpen", {"textDocument": {
                "uri": URI, "languageId": "python", "version": 0, "text": source}})
            phase = replay(client, source, trace, paced, version=0)
            client.notify("textDocument/didClose", {"textDocument": {"uri": URI}})
            # Every request that ran the model, cancelled or not (typed-through ones did not).
            ran = [m for m in phase.metrics if m["promptTokens"]]
            prompt = sum(m["promptTokens"] for m in ran)
            reused = sum(m["reusedTokens"] for m in ran)
            stops = [m["stoppedMs"] for m in phase.metrics if m["cancelled"]]
            row[name] = {
                "keystrokes": len(trace),
                "answered": len(phase.latencies),
                "cancelled": phase.cancelled,
                "p50_ms": 1000 * statistics.median(phase.latencies),
                "p95_ms": 1000 * _p95(phase.latencies),
                "reused_share": reused / prompt if prompt else 0.0,
                "mean_prompt_tokens": prompt / max(1, len(ran)),
                "cancelled_computed_tokens": sum(m["computedTokens"] for m in phase.metrics
                                                 if m["cancelled"]),
                "stop_after_cancel_ms_p50": statistics.median(stops) if stops else 0.0,
                "stop_after_cancel_ms_p95": _p95(stops) if stops else 0.0,
                "stop_after_cancel_ms_max": max(stops, default=0.0),
            }
            print(f"  cache {'on' if cache else 'off'}, {name}: "
                  f"p50 {row[name]['p50_ms']:.0f} ms", file=sys.stderr, flush=True)
        row["peak_rss_mib"] = client.peak_rss_mib()
        row["rss_mib"] = client.peak_rss_mib("VmRSS")
        return row
    finally:
        client.close()


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="keep the random model here between runs")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--paced-keys", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="compare the cache-on server of this other checkout (e.g. a "
                        "`git worktree` of an earlier commit) with this one, alternately")
    parser.add_argument("--rounds", type=int, default=2, help="rounds with --baseline")
    args = parser.parse_args()
    source = SOURCE.read_text()
    assert source.count("\n") >= 300
    keys = build_trace(source, args.seed)
    if args.baseline:
        compare(args, source, keys)
        return
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        native, _ = ensure_checkpoints(Path(args.model_dir or tmp))
        print(f"{SOURCE} ({source.count(chr(10))} lines), {len(keys)} keystrokes, "
              f"model {native}, {args.dtype}, maxTokens {args.max_tokens}")
        rows = [run_server(native, cache, source, keys, args.paced_keys, args.dtype,
                           args.max_tokens) for cache in (False, True)]
    off, on = rows
    print(f"\n{'':34}{'cache off':>12}{'cache on':>12}")
    for phase, metric, unit in (
            ("paced", "p50_ms", "ms"), ("paced", "p95_ms", "ms"),
            ("live", "p50_ms", "ms"), ("live", "p95_ms", "ms"),
            ("paced", "reused_share", ""),
            ("live", "answered", ""), ("live", "cancelled", ""),
            ("live", "reused_share", ""), ("live", "mean_prompt_tokens", ""),
            ("live", "cancelled_computed_tokens", ""),
            ("live", "stop_after_cancel_ms_p50", "ms"),
            ("live", "stop_after_cancel_ms_p95", "ms"),
            ("live", "stop_after_cancel_ms_max", "ms")):
        name = f"{phase} {metric}" + (f" ({unit})" if unit else "")
        a, b = off[phase][metric], on[phase][metric]
        print(f"{name:34}{a:>12.3f}{b:>12.3f}" if isinstance(a, float) else
              f"{name:34}{a:>12}{b:>12}")
    print(f"{'peak RSS (MiB)':34}{off['peak_rss_mib']:>12.0f}{on['peak_rss_mib']:>12.0f}")
    print(f"{'RSS at the end (MiB)':34}{off['rss_mib']:>12.0f}{on['rss_mib']:>12.0f}")
    ratio = on["paced"]["p50_ms"] / off["paced"]["p50_ms"]
    print(f"\np50 latency with the cache / without: {ratio:.3f} (target <= 0.2); prompt tokens "
          f"reused with the cache: {on['live']['reused_share']:.1%} (target >= 90%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"off": off, "on": on, "ratio": ratio}, indent=2))


def compare(args: argparse.Namespace, source: str, keys: list[Key]) -> None:
    """Before/after on the same machine: the baseline checkout's server and this one, cache
    on, alternately, `--rounds` times each; medians of the per-run figures."""
    here = str(Path(__file__).resolve().parents[1])
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        native, _ = ensure_checkpoints(Path(args.model_dir or tmp))
        print(f"{len(keys)} keystrokes, model {native}, {args.dtype}, maxTokens "
              f"{args.max_tokens}; baseline {args.baseline}")
        build_kernels(Path(args.baseline))
        for round_ in range(args.rounds):
            order = [("baseline", args.baseline), ("current", here)]
            for label, path in order if round_ % 2 == 0 else reversed(order):
                print(f"round {round_ + 1}: {label}", file=sys.stderr, flush=True)
                runs[label].append(run_server(native, True, source, keys, args.paced_keys,
                                              args.dtype, args.max_tokens,
                                              pythonpath=path if label == "baseline"
                                              else None))
    print(f"\n{'':34}{'baseline':>12}{'current':>12}{'ratio':>8}")
    for phase, metric in (("paced", "p50_ms"), ("paced", "p95_ms"), ("live", "p50_ms"),
                          ("live", "reused_share"), ("live", "stop_after_cancel_ms_p50")):
        a = statistics.median(r[phase][metric] for r in runs["baseline"])
        b = statistics.median(r[phase][metric] for r in runs["current"])
        print(f"{phase + ' ' + metric:34}{a:>12.3f}{b:>12.3f}{b / a if a else 0:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
