"""The decode step on a CUDA device with and without CUDA graphs (`engine/runtime/step_graphs.py`):
the same compiled step over the same cache, its kernels launched one by one from Python or
replayed from a graph captured per cache and span. Needs a GPU; on a machine without one it
says so and stops (there is nothing to measure on the CPU, whose step is the native C++ one).

    .venv/bin/python benchmarks/cuda_graphs.py [--dtype bfloat16] [--context 1900] [--rounds 20]

The random dense ~200M model of `bench_models.py` (written once to `--model-dir`), a prompt
of `--context` tokens prefilled into one cache per side, then `--rounds` rounds of 8 greedy
steps (a keystroke's worth) per side, the sides interleaved round by round, each round
synchronised and timed with the wall clock; the medians a step and their ratio are printed.
An extra first round of each side is not counted (the graphs' first capture happens there;
the cache's next span of 64 slots captures again, inside the counted rounds, as it would
while typing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_models import ensure_checkpoints, model_root

import engine
from engine.runtime.compiled import FastDecoder

ROUND = 8


def timed_round(decoder: FastDecoder, cache: object, token: torch.Tensor,
                start: int) -> tuple[float, torch.Tensor]:
    """Seconds for ROUND greedy steps from position `start`, and the last token."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(ROUND):
        logits = decoder.step(token, torch.tensor([start + i], device="cuda"), cache)
        token = logits.argmax(-1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--context", type=int, default=1900, help="prompt tokens prefilled")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of 8 steps per side")
    parser.add_argument("--model-dir", help="write the random checkpoint here, or reuse it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: CUDA graphs have nothing to speed up (the CPU runs the "
              "native step)", file=sys.stderr)
        return 2
    max_seq_len = args.context + ROUND * (args.rounds + 1) + 64
    with model_root(args.model_dir) as root:
        native, _ = ensure_checkpoints(root)
        model = engine.load(native, device="cuda", dtype=args.dtype)
    sides = {"launched": FastDecoder(model, 1, max_seq_len, cuda_graphs=False),
             "graphs": FastDecoder(model, 1, max_seq_len)}
    prompt = torch.randint(3, 32000, (1, args.context), device="cuda")
    caches, tokens = {}, {}
    with torch.inference_mode():
        for name, decoder in sides.items():
            caches[name] = decoder.new_cache()
            logits = model.forward(prompt, torch.arange(args.context, device="cuda")[None],
                                   caches[name], output_index=torch.tensor([args.context - 1],
                                                                           device="cuda"))
            tokens[name] = logits.argmax(-1)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds + 1):
        for name, decoder in sides.items():
            seconds, tokens[name] = timed_round(decoder, caches[name], tokens[name],
                                                args.context + r * ROUND)
            if r:
                times[name].append(seconds / ROUND)
    graphs = sides["graphs"].graphs
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {args.context} tokens of context, "
          f"{args.rounds} rounds of {ROUND} steps per side, interleaved")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"  {name:9s} {ms:7.2f} ms a step ({1e3 / ms:6.1f} tokens/s)")
    ratio = statistics.median(times["graphs"]) / statistics.median(times["launched"])
    print(f"  graphs / launched: {ratio:.2f}x "
          f"({graphs.captures if graphs else 0} captures, {graphs.replays if graphs else 0} "
          f"replays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
