"""The decode step with the weights on 2 MiB pages (engine/arch/pages.py) and the prefetch
distance tuned at load (runtime/native.py's `tune_stream_ahead`), against what came before:
the weights where loading put them (malloc's 4 KiB pages) and the loops prefetching 4 KiB
ahead. Both in one process, at each weight precision.

The random model (bench_models.py) is loaded twice per precision, once with
TRAMONTANE_HUGE_PAGES=0; each load's decoder tunes its distance, which is printed. Then
`--repeats` rounds of 128 greedy tokens after a 512-token prompt (llama_cpp.py's decode run),
four sides in turn, the order reversed every round: 4 KiB pages at 4096 bytes ahead (before),
4 KiB pages at their tuned distance, 2 MiB pages at 4096, and 2 MiB pages at their tuned
distance (after). It prints each side's median tok/s and its ratio to "before" (median of the
per-round ratios), and the read bandwidth of a float32 sum on each kind of page
(bandwidth.py).

    .venv/bin/python benchmarks/weight_pages.py --model-dir /tmp/bench-model \\
        [--precisions bf16,int8,int4] [--repeats 8]
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from bandwidth import read_bandwidth
from bench_models import ensure_checkpoints
from llama_cpp import PRECISIONS
from sides import Side, arguments, decode_in_turn, report

import engine
from engine.arch import kernels, pages
from engine.runtime import native as native_step

BEFORE = 4096  # the loops' distance before it was tuned


def load(native: Path, quantize: str | None, quantized_dir: Path,
         huge: bool) -> tuple[engine.Model, int]:
    """The model on the pages asked for, with its decoder, and the distance it tuned."""
    os.environ[pages.ENV] = "1" if huge else "0"
    try:
        model = engine.load(native, dtype="bfloat16", quantize=quantize,
                            quantized_dir=quantized_dir)
    finally:
        del os.environ[pages.ENV]
    model.decoder = engine.compile_decode_step(model, 2560, 1, 512, native=True)
    tuned = kernels.set_stream_ahead(BEFORE)
    return model, tuned


def run_precision(name: str, native: Path, quantized_dir: Path,
                  repeats: int) -> dict[str, tuple[float, float]]:
    quantize, _ = PRECISIONS[name]
    plain, plain_ahead = load(native, quantize, quantized_dir, huge=False)
    huge, huge_ahead = load(native, quantize, quantized_dir, huge=True)
    rng = torch.Generator().manual_seed(0)
    prompt = [1, *torch.randint(100, 30000, (511,), generator=rng).tolist()]
    distances = {"4 KiB pages, 4096 ahead (before)": (plain, BEFORE),
                 f"4 KiB pages, {plain_ahead} ahead (tuned)": (plain, plain_ahead),
                 "2 MiB pages, 4096 ahead": (huge, BEFORE),
                 f"2 MiB pages, {huge_ahead} ahead (tuned: after)": (huge, huge_ahead)}
    sides: dict[str, Side] = {
        side: (model, lambda ahead=ahead: kernels.set_stream_ahead(ahead))
        for side, (model, ahead) in distances.items()}
    try:
        return decode_in_turn(sides, prompt, repeats)
    finally:
        kernels.set_stream_ahead(BEFORE)


def main() -> None:
    args = arguments(__doc__, repeats=8)
    if not kernels.available():
        raise SystemExit("the C++ kernels are not built here: the native step runs in them")
    if not pages.enabled():
        raise SystemExit("no transparent huge pages to ask for here (Linux, "
                         f"{pages.ENV} unset or 1)")
    native, _ = ensure_checkpoints(Path(args.model_dir))
    print(f"kernels: {kernels.instruction_set()} loops; tuned over the first "
          f"{native_step.TUNE_BYTES >> 20} MiB of projections", flush=True)
    for name in args.precisions.split(","):
        result = run_precision(name, native, Path(args.model_dir) / "quantized", args.repeats)
        report(name, result, args.repeats)
    bandwidth = read_bandwidth()
    print(f"\nread bandwidth (1 GiB float32 sum): 4 KiB pages {bandwidth['read_4k']:.1f} GB/s, "
          f"2 MiB pages {bandwidth.get('read_2m', float('nan')):.1f} GB/s")


if __name__ == "__main__":
    main()
