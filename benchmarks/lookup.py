"""Speculative decoding by lookup (engine/runtime/lookup.py): what a verify pass costs, and what
drafts save on the editing trace, at each weight precision, in one run.

- verify: one pass of T positions (the last token and a draft of T - 1) through the native
  decode step (`phases.verify_greedy`) at position 1900 of a PrefixCache's cache, against one
  one-token pass (T = 1); the cache is cut back after each call (`cache.keep`). The minimum of
  `--repeats` rounds of 5 calls for each T, the T interleaved within a round. A draft of T - 1
  tokens that is all accepted saves T - 1 passes: it pays where the pass costs less than T.
- trace: the keystrokes of edit_trace.py's trace (each keystroke's FIM prompt as the server
  builds it, llama_cpp.py's `trace_prompts`), 8 greedy tokens each, through two prefix caches:
  lookup 0 and `--lookup N`, the order swapped every keystroke. The outputs must be identical
  (the script fails otherwise); it prints both sides' p50 and p95 (the first keystroke, a full
  prefill, left out), their ratio, and the tokens drafted and accepted.

A random model's consecutive completions share little (its greedy output rarely repeats the
context), so the trace here shows what drafts cost more than what they save; a real model's
completions overlap far more while a person types.

    .venv/bin/python benchmarks/lookup.py --model-dir /tmp/bench-model \\
        [--precisions bf16,int8,int4] [--keys 60] [--lookup 8] [--repeats 3] [--isa avx2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from pathlib import Path
from typing import Any

from llama_cpp import PRECISIONS, p95, trace_prompts

VERIFY_AT = 1900
VERIFY_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)


def verify_costs(model: Any, repeats: int) -> dict[int, float]:
    """Seconds of one verify pass of T positions at position VERIFY_AT, for each T."""
    import torch

    import engine
    from engine.runtime.phases import verify_greedy

    rng = torch.Generator().manual_seed(0)
    prompt = [1, *torch.randint(100, 30000, (VERIFY_AT - 1,), generator=rng).tolist()]
    cache = engine.PrefixCache(model, max_seq_len=2560, budget_bytes=2**30, rewind=512)
    list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=1), eos_id=-1,
                       chunk_size=256, prefix_cache=cache, cache_key="doc"))
    lease = cache.checkout("doc", [*prompt, 5])
    assert lease is not None and lease.reused == VERIFY_AT
    times: dict[int, list[float]] = {t: [] for t in VERIFY_ROWS}
    with torch.inference_mode():
        for _ in range(repeats):
            for t in VERIFY_ROWS:
                tokens = torch.randint(100, 30000, (1, t), generator=rng)
                positions = torch.arange(VERIFY_AT, VERIFY_AT + t)[None]
                start = time.perf_counter()
                for _ in range(5):
                    if verify_greedy(model, tokens, positions, lease.cache) is None:
                        raise SystemExit("no native decode step: the C++ kernels are not built")
                    lease.cache.keep(VERIFY_AT)
                times[t].append((time.perf_counter() - start) / 5)
    return {t: min(v) for t, v in times.items()}


def trace(model: Any, prompts: list[list[int]], lookup: int) -> dict[str, Any]:
    import engine

    sampling = engine.SamplingParams(max_tokens=8)
    caches = {n: engine.PrefixCache(model, max_seq_len=2560, budget_bytes=2**30, rewind=512)
              for n in (0, lookup)}
    times: dict[int, list[float]] = {0: [], lookup: []}
    outputs: dict[int, list[list[int]]] = {0: [], lookup: []}
    drafted = accepted = 0
    for i, prompt in enumerate(prompts):
        for n in (0, lookup) if i % 2 == 0 else (lookup, 0):
            start = time.perf_counter()
            events = list(engine.stream(prompt, model, sampling, eos_id=-1, chunk_size=256,
                                        prefix_cache=caches[n], cache_key="doc", lookup=n))
            times[n].append(time.perf_counter() - start)
            outputs[n].append([e.token for e in events if isinstance(e, engine.TokenEvent)])
            if n:
                drafted += events[-1].drafted_tokens
                accepted += events[-1].accepted_tokens
    if outputs[0] != outputs[lookup]:
        raise SystemExit("lookup changed a greedy completion")
    return {"p50": [statistics.median(times[n][1:]) for n in (0, lookup)],
            "p95": [p95(times[n][1:]) for n in (0, lookup)],
            "drafted": drafted, "accepted": accepted, "tokens": 8 * len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="the random model (bench_models.py)")
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--keys", type=int, default=60, help="keystrokes of the trace")
    parser.add_argument("--lookup", type=int, default=8, help="most tokens drafted a pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isa", help="cap the kernels' loops at this instruction set "
                                      "(avx2, portable): another CPU's loops on this one")
    args = parser.parse_args()
    from bench_models import ensure_checkpoints

    from engine.arch import kernels

    native, _ = ensure_checkpoints(Path(args.model_dir))
    if not kernels.available():
        raise SystemExit("the C++ kernels are not built here: lookup checks drafts in them")
    capped = kernels.instruction_set_capped(args.isa) if args.isa else contextlib.nullcontext()
    with capped:
        run(args, native)


def run(args: argparse.Namespace, native: Path) -> None:
    import engine
    from engine.arch import kernels

    print(f"kernels: {kernels.instruction_set()} loops", flush=True)
    prompts = trace_prompts(engine.load(native), args.keys)
    for name in args.precisions.split(","):
        quantize, _ = PRECISIONS[name]
        model = engine.load(native, dtype="bfloat16", quantize=quantize,
                            quantized_dir=Path(args.model_dir) / "quantized")
        gc.collect()
        gc.freeze()  # as the server does after a load
        model.decoder = engine.compile_decode_step(model, 2560, 1, 512, native=True)
        try:
            costs = verify_costs(model, args.repeats)
            one = costs[1]
            print(f"{name}: one pass at position {VERIFY_AT}: {one * 1e3:.1f} ms; "
                  "T positions cost (x one): " +
                  ", ".join(f"T={t} {c / one:.2f}x" for t, c in costs.items()), flush=True)
            r = trace(model, prompts, args.lookup)
            (a50, b50), (a95, b95) = r["p50"], r["p95"]
            print(f"{name}: trace of {len(prompts)} keys, lookup {args.lookup} vs 0: p50 "
                  f"{b50 * 1e3:.1f} vs {a50 * 1e3:.1f} ms ({b50 / a50:.2f}x), p95 "
                  f"{b95 * 1e3:.1f} vs {a95 * 1e3:.1f} ms ({b95 / a95:.2f}x); drafted "
                  f"{r['drafted']} of {r['tokens']} tokens, accepted {r['accepted']}; "
                  "outputs identical", flush=True)
        finally:
            model.decoder = None
            gc.unfreeze()


if __name__ == "__main__":
    main()
