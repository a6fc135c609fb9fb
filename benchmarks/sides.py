"""Decode before and after a change, in one process: the benchmarks that compare two or more
ways of running the same step (weight_pages.py, row_shares.py) time each side in turn, the
order reversed every round, so that a host whose memory slows down midway slows every side
alike, and report each side's median and the median of its per-round ratios to the first."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import engine

# One side: the model it decodes with, and what to set before each of its runs.
Side = tuple[engine.Model, Callable[[], object]]


def decode_rate(model: engine.Model, prompt: list[int], n: int = 129) -> float:
    """Tokens a second of `n - 1` greedy tokens after `prompt` (the first token, which the
    prompt's prefill yields, is not counted)."""
    stamps = [time.perf_counter() for event in engine.stream(
        prompt, model, engine.SamplingParams(max_tokens=n), eos_id=-1, chunk_size=4096)
        if isinstance(event, engine.TokenEvent)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_in_turn(sides: dict[str, Side], prompt: list[int],
                   repeats: int) -> dict[str, tuple[float, float]]:
    """{side: (median tok/s, median ratio to the first side)} over `repeats` rounds of 128
    tokens after `prompt`, after one short warm-up run of each side."""
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for model, setup in sides.values():
        setup()
        decode_rate(model, prompt, 17)
    for r in range(repeats):
        for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
            model, setup = sides[side]
            setup()
            rates[side].append(decode_rate(model, prompt))
    first = rates[next(iter(sides))]
    return {side: (statistics.median(r), statistics.median(
        a / b for a, b in zip(r, first, strict=True))) for side, r in rates.items()}


def arguments(doc: str, repeats: int) -> argparse.Namespace:
    """The command line these benchmarks share: --model-dir, --precisions, --repeats."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="the random model (bench_models.py)")
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()


def report(name: str, result: dict[str, tuple[float, float]], repeats: int) -> None:
    """One precision's sides, as `decode_in_turn` measured them."""
    print(f"\n{name}: decode tok/s (128 tokens after 512), median of {repeats} rounds")
    width = max(len(side) for side in result)
    for side, (rate, ratio) in result.items():
        print(f"  {side:<{width}} {rate:6.1f} tok/s  {ratio:.3f}x", flush=True)
