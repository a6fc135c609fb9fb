"""The decode step with the products' threads taking rows from each other's shares when their
own is done (engine/arch/row_shares.h), against a fixed equal share each (what came before),
in one process, at each weight precision.

The random model (bench_models.py) is loaded once per precision; then `--repeats` rounds of
128 greedy tokens after a 512-token prompt (llama_cpp.py's decode run), the two sides in turn,
the order reversed every round. It prints each side's median tok/s and the median of the
per-round ratios.

    .venv/bin/python benchmarks/row_shares.py --model-dir /tmp/bench-model \\
        [--precisions bf16,int8,int4] [--repeats 10]
"""

from __future__ import annotations

from pathlib import Path

import torch
from bench_models import ensure_checkpoints
from llama_cpp import PRECISIONS
from sides import Side, arguments, decode_in_turn, report

import engine
from engine.arch import kernels


def run_precision(name: str, native: Path, quantized_dir: Path,
                  repeats: int) -> dict[str, tuple[float, float]]:
    quantize, _ = PRECISIONS[name]
    model = engine.load(native, dtype="bfloat16", quantize=quantize,
                        quantized_dir=quantized_dir)
    model.decoder = engine.compile_decode_step(model, 2560, 1, 512, native=True)
    rng = torch.Generator().manual_seed(0)
    prompt = [1, *torch.randint(100, 30000, (511,), generator=rng).tolist()]
    sides: dict[str, Side] = {
        "a fixed share each (before)": (model, lambda: kernels.set_balanced_rows(False)),
        "rows taken from the others' (after)": (model, lambda: kernels.set_balanced_rows(True))}
    try:
        return decode_in_turn(sides, prompt, repeats)
    finally:
        kernels.set_balanced_rows(True)


def main() -> None:
    args = arguments(__doc__, repeats=10)
    if not kernels.available():
        raise SystemExit("the C++ kernels are not built here: the native step runs in them")
    native, _ = ensure_checkpoints(Path(args.model_dir))
    print(f"kernels: {kernels.instruction_set()} loops on {kernels.parallel_threads()} threads",
          flush=True)
    for name in args.precisions.split(","):
        result = run_precision(name, native, Path(args.model_dir) / "quantized", args.repeats)
        report(name, result, args.repeats)


if __name__ == "__main__":
    main()
