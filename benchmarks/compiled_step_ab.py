"""The compiled one-token decode step of this checkout against another's, alternately.

Each sample is a fresh process of one checkout (`PYTHONPATH=<checkout>`): it loads the model,
builds the compiled step as the server does (batch 1, 2304 positions, rewind 16), prefills
1500 random tokens and times 3 x 40 steps after 10 warm-up steps. Samples alternate between
the two checkouts (`--pairs` times), so a change in the machine's load falls on both; the
medians and their ratio are printed. Each checkout's C++ kernels (`engine/arch/kernels.py`,
where it has them) are built first, into `<checkout>/.torch_extensions`. Works with checkouts
from before the engine's layout changed (`engine/fast_decode.py`) and after
(`engine/runtime/compiled.py`). `--baseline-isa avx2` caps the baseline's kernels at that
instruction set's loops: with `--baseline .`, this checkout's AVX-512 loops against its AVX2 ones.

    .venv/bin/python benchmarks/compiled_step_ab.py --model-dir /tmp/bench-model/native \\
        --baseline /tmp/before [--dtype float32] [--quantize int8|int4] [--pairs 3] \\
        [--baseline-isa avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = r"""
import json, os, sys, time, torch
from pathlib import Path
import engine
checkout = Path(sys.argv[3])
if (checkout / "engine" / "fast_decode.py").exists():
    from engine.fast_decode import FastDecoder
else:
    from engine.runtime.compiled import FastDecoder
assert Path(engine.__file__).resolve().is_relative_to(checkout.resolve()), engine.__file__
quantize = sys.argv[4] if len(sys.argv) > 4 else None
model = engine.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]),
                    **({"quantize": quantize} if quantize else {}))
if os.environ.get("BENCH_ISA"):
    from engine.arch import kernels
    assert kernels.available()
    torch.ops.tramontane.cap_instruction_set(os.environ["BENCH_ISA"])
decoder = FastDecoder(model, 1, 2304, 16)
torch.manual_seed(0)
with torch.inference_mode():
    model.forward(torch.randint(100, 30000, (1, 1500)), torch.arange(1500)[None], decoder.cache)
token = torch.tensor([5])
for p in range(1500, 1510):
    decoder.step(token, torch.tensor([p]))
times = []
for rep in range(3):
    start = time.perf_counter()
    for p in range(1510 + rep * 40, 1550 + rep * 40):
        decoder.step(token, torch.tensor([p]))
    times.append((time.perf_counter() - start) / 40 * 1000)
print(json.dumps(times))
"""


def checkout_env(checkout: Path) -> dict[str, str]:
    """The checkout first on the path; its C++ kernels, if it has any, in a folder of its own
    (the two checkouts' sources differ, and one folder would rebuild them at each switch)."""
    return {**os.environ, "PYTHONPATH": str(checkout),
            "TORCH_EXTENSIONS_DIR": str(checkout / ".torch_extensions")}


def build_kernels(checkout: Path) -> None:
    """Build a checkout's C++ kernels before its first sample (loading never builds them)."""
    if (checkout / "engine" / "arch" / "kernels.py").exists():
        subprocess.run([sys.executable, "-m", "engine.arch.kernels"], env=checkout_env(checkout),
                       cwd=checkout, timeout=900, check=True)


def sample(checkout: Path, model: Path, dtype: str, quantize: str | None,
           isa: str | None) -> list[float]:
    # From the checkout itself: `-c` puts the working directory first on sys.path.
    env = {**checkout_env(checkout), **({"BENCH_ISA": isa} if isa else {})}
    done = subprocess.run([sys.executable, "-c", SAMPLE, str(model), dtype, str(checkout),
                           *([quantize] if quantize else [])],
                          env=env, cwd=checkout, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"the sample of {checkout} failed (exit {done.returncode}):\n"
                 + "\n".join(done.stderr.splitlines()[-15:]))
    return list(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path,
                        help="a dense checkpoint (e.g. decode.py's bench model, native layout)")
    parser.add_argument("--baseline", required=True, type=Path, help="the other checkout")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="weight-only quantization at load (checkouts that have it; the "
                             "quantized sidecar in the user's cache makes later loads fast)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--baseline-isa", choices=["avx2", "portable"],
                        help="cap the baseline's kernels at this instruction set's loops")
    args = parser.parse_args()
    sides = {"baseline": args.baseline.resolve(), "current": ROOT}
    isas = {"baseline": args.baseline_isa, "current": None}
    results: dict[str, list[float]] = {name: [] for name in sides}
    for checkout in sides.values():
        build_kernels(checkout)
    for pair in range(args.pairs):
        order = list(sides) if pair % 2 == 0 else list(reversed(sides))
        for name in order:
            ms = sample(sides[name], args.model_dir, args.dtype, args.quantize, isas[name])
            results[name] += ms
            print(f"pair {pair + 1}, {name}: " + ", ".join(f"{m:.1f}" for m in ms) + " ms/step",
                  flush=True)
    base, cur = (statistics.median(results[n]) for n in ("baseline", "current"))
    weights = args.dtype + (f", {args.quantize} weights" if args.quantize else "")
    if args.baseline_isa:
        weights += f"; the baseline's kernels capped at {args.baseline_isa}"
    print(f"\ncompiled decode step at ~1.5k positions, {weights}, median of "
          f"{len(results['current'])} samples: baseline {base:.1f} ms, current {cur:.1f} ms, "
          f"ratio {cur / base:.2f}")


if __name__ == "__main__":
    main()
