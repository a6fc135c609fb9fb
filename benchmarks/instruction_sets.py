"""The decode step with the kernels' best instruction set against the others the CPU runs, in one
process: the same model, cache and positions, the instruction set switched between blocks of
steps (`kernels.instruction_set_capped`), the order alternated block after block, so that a
change in the machine's load falls on every set (separate processes, as `compiled_step_ab.py`
runs, add each process's own placement of the weights to the noise).

The step is the server's (`FastDecoder`: the C++ step where it runs), batch 1, at ~1.5k
positions: 1500 random tokens prefilled, then `--rounds` blocks of 20 timed steps per set after
3 untimed ones.

    .venv/bin/python benchmarks/instruction_sets.py --model-dir /tmp/bench-model/native \\
        [--weights bf16,int8,int4] [--rounds 10] [--keys 120]

`--keys N` also replays the first N keystrokes of edit_trace.py's trace (llama_cpp.py's FIM
prompts, 8 greedy tokens each, the prefix cache kept), the set switched every two keystrokes,
and prints each set's keystroke p50.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import engine
from engine.arch import kernels
from engine.runtime.compiled import FastDecoder

BLOCK, WARM, PROMPT = 20, 3, 1500


def step_times(model_dir: Path, weights: str, sets: list[str], rounds: int) -> dict[str, float]:
    """Median milliseconds per step under each instruction set."""
    quantize = None if weights == "bf16" else weights
    model = engine.load(model_dir, dtype=torch.bfloat16, quantize=quantize,
                        quantized_dir=model_dir.parent / "quantized")
    decoder = FastDecoder(model, 1, 2304, 16)
    torch.manual_seed(0)
    with torch.inference_mode():
        model.forward(torch.randint(100, 30000, (1, PROMPT)), torch.arange(PROMPT)[None],
                      decoder.cache)
    token, position = torch.tensor([5]), torch.tensor([PROMPT])
    blocks: dict[str, list[float]] = {name: [] for name in sets}
    for r in range(rounds):
        for name in sets if r % 2 == 0 else reversed(sets):
            with kernels.instruction_set_capped(name):
                for _ in range(WARM):
                    decoder.step(token, position)
                start = time.perf_counter()
                for _ in range(BLOCK):
                    decoder.step(token, position)
                blocks[name].append((time.perf_counter() - start) / BLOCK * 1e3)
    return {name: statistics.median(ms) for name, ms in blocks.items()}


def keystrokes(model_dir: Path, weights: str, sets: list[str], keys: int) -> dict[str, float]:
    """Median milliseconds per keystroke of the trace under each instruction set."""
    from llama_cpp import trace_prompts

    quantize = None if weights == "bf16" else weights
    model = engine.load(model_dir, dtype=torch.bfloat16, quantize=quantize,
                        quantized_dir=model_dir.parent / "quantized")
    model.decoder = engine.compile_decode_step(model, 2560, 1, 512, native=True)
    prompts = trace_prompts(engine.load(model_dir), keys + 1)
    sampling = engine.SamplingParams(max_tokens=8)
    cache = engine.PrefixCache(model, max_seq_len=2560, budget_bytes=2**30, rewind=512)
    times: dict[str, list[float]] = {name: [] for name in sets}
    for i, prompt in enumerate(prompts):
        name = sets[(i // 2) % len(sets)]
        with kernels.instruction_set_capped(name):
            start = time.perf_counter()
            list(engine.stream(prompt, model, sampling, eos_id=-1, chunk_size=256,
                               prefix_cache=cache, cache_key="doc"))
        if i:  # the first is the whole prompt's prefill
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ms) for name, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path,
                        help="a dense checkpoint (bench_models.py's, native layout)")
    parser.add_argument("--weights", default="bf16,int8,int4")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--keys", type=int, default=0, help="keystrokes of the trace to replay")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the C++ kernels are not built here (python -m engine.arch.kernels)")
    sets = [name for name in kernels.cpu_instruction_sets() if name != "portable"]
    if len(sets) < 2:
        raise SystemExit(f"this CPU runs one vector instruction set ({sets}): nothing to compare")
    best = sets[0]
    print(f"decode step at ~{PROMPT} positions, median ms per step of {args.rounds} blocks of "
          f"{BLOCK} steps per instruction set; ratio: {best}'s time / the other's")
    for weights in args.weights.split(","):
        ms = step_times(args.model_dir, weights, sets, args.rounds)
        others = ", ".join(f"{name} {ms[name]:.2f} ms (ratio {ms[best] / ms[name]:.3f})"
                           for name in sets[1:])
        print(f"  {weights:5} {best} {ms[best]:.2f} ms; {others}", flush=True)
        if args.keys:
            ms = keystrokes(args.model_dir, weights, sets, args.keys)
            others = ", ".join(f"{name} {ms[name]:.1f} ms (ratio {ms[best] / ms[name]:.3f})"
                               for name in sets[1:])
            print(f"  {weights:5} keystroke p50: {best} {ms[best]:.1f} ms; {others}", flush=True)


if __name__ == "__main__":
    main()
