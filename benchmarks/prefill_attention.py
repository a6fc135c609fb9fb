"""A prompt chunk's attention in the C++ kernel (engine/arch/prefill_attention.cpp, bfloat16 dot
products) against SDPA, in one process: one layer's attention at the shapes of the random
model's first prompt, then the first prompt itself, both sides in turn.

1. One layer's attention (16 query heads on 4 key/value heads of 64 dimensions, the random
   model's): a chunk of 256 queries after 0, 512 and 1280 cached keys with the causal mask the
   cache plans, and a whole 2048-token prompt in one chunk (SDPA's `is_causal`, which the
   layers take for a first chunk). Best of `--repeats` rounds a side; GFLOP/s count the
   allowed query-key pairs (4 * hd flops each).
2. The first completion after opening a file (llama_cpp.py's first prompt: 1530 tokens from an
   empty cache in chunks of 256, then 8 tokens), at each precision: SDPA (the layers' choice
   turned off) against the kernel, median of `--repeats` rounds in turn, the order reversed
   every round.

    .venv/bin/python benchmarks/prefill_attention.py --model-dir /tmp/bench-model \\
        [--precisions bf16,int8,int4] [--repeats 5]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_models import ensure_checkpoints
from llama_cpp import PRECISIONS
from sides import arguments

import engine
from engine.arch import attention, kernels

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 16, 4, 64, 256


def chunk_operands(cached: int, length: int) -> tuple[torch.Tensor, ...]:
    """Queries of a chunk of `length` after `cached` keys, as the layers pass them, and the
    mask the cache plans for it."""
    keys_n = cached + length
    q = torch.randn(1, length, HEADS, HEAD_DIM).to(torch.bfloat16).transpose(1, 2)
    keys = torch.randn(1, KV_HEADS, keys_n, HEAD_DIM).to(torch.bfloat16)
    values = torch.randn_like(keys)
    allowed = torch.arange(keys_n)[None, :] <= torch.arange(cached, keys_n)[:, None]
    return q, keys, values, allowed[None, None]


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for r in range(repeats):
        for side in list(fns) if r % 2 == 0 else reversed(list(fns)):
            start = time.perf_counter()
            fns[side]()
            best[side] = min(best[side], time.perf_counter() - start)
    return best


def layer_sides(cached: int, length: int) -> dict[str, Callable[[], object]]:
    """SDPA as the layers call it (`is_causal` for a first chunk, else the mask) and the kernel,
    on one chunk's operands."""
    q, keys, values, allowed = chunk_operands(cached, length)
    if cached == 0:
        def sdpa() -> object:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                  enable_gqa=True)
    else:
        def sdpa() -> object:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed,
                                                  enable_gqa=True)

    def kernel() -> object:
        return torch.ops.tramontane.prefill_attention(q, keys, values, allowed,
                                                      HEAD_DIM ** -0.5)

    return {"sdpa": sdpa, "kernel": kernel}


def one_layer(repeats: int) -> None:
    print("\none layer's attention (16 query heads, 4 key/value heads, 64 dimensions)")
    for cached, length in ((0, CHUNK), (512, CHUNK), (1280, CHUNK), (0, 2048)):
        best = best_of(layer_sides(cached, length), repeats)
        pairs = length * cached + length * (length + 1) / 2
        rates = {side: 4 * HEAD_DIM * HEADS * pairs / s / 1e9 for side, s in best.items()}
        print(f"  {length} queries after {cached:4} keys: SDPA {best['sdpa'] * 1e3:6.2f} ms "
              f"({rates['sdpa']:4.0f} GFLOP/s), kernel {best['kernel'] * 1e3:6.2f} ms "
              f"({rates['kernel']:4.0f} GFLOP/s): {best['kernel'] / best['sdpa']:.2f}x the time",
              flush=True)


def first_prompt(model: engine.Model, prompt: list[int]) -> float:
    """8 tokens after `prompt` from an empty prefix cache, in chunks of 256 (llama_cpp.py's)."""
    cache = engine.PrefixCache(model, max_seq_len=2560, budget_bytes=2**30, rewind=512)
    start = time.perf_counter()
    list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=8), eos_id=-1,
                       chunk_size=CHUNK, prefix_cache=cache, cache_key="doc"))
    return time.perf_counter() - start


def first_prompts(native: Path, quantized_dir: Path, precisions: list[str],
                  repeats: int) -> None:
    rng = torch.Generator().manual_seed(0)
    prompt = [1, *torch.randint(100, 30000, (1529,), generator=rng).tolist()]
    chosen = attention.bf16_attention
    print(f"\nthe first prompt ({len(prompt)} tokens, empty cache, chunks of {CHUNK}, 8 tokens), "
          f"median of {repeats} rounds in turn")
    for name in precisions:
        quantize, _ = PRECISIONS[name]
        model = engine.load(native, dtype="bfloat16", quantize=quantize,
                            quantized_dir=quantized_dir)
        model.decoder = engine.compile_decode_step(model, 2560, 1, 512, native=True)
        sides: dict[str, Callable[[torch.Tensor], bool]] = {
            "SDPA (before)": lambda q: False, "kernel (after)": chosen}
        times: dict[str, list[float]] = {side: [] for side in sides}
        try:
            for side in sides:  # warm-up
                attention.bf16_attention = sides[side]
                first_prompt(model, prompt)
            for r in range(repeats):
                for side in list(sides) if r % 2 == 0 else reversed(list(sides)):
                    attention.bf16_attention = sides[side]
                    times[side].append(first_prompt(model, prompt))
        finally:
            attention.bf16_attention = chosen
        before, after = (statistics.median(t) for t in times.values())
        ratio = statistics.median(a / b for a, b in zip(*reversed(times.values()), strict=True))
        print(f"  {name}: SDPA {before:.2f} s, kernel {after:.2f} s: {ratio:.2f}x the time",
              flush=True)


def main() -> None:
    args = arguments(__doc__, repeats=5)
    if not (kernels.available() and torch.ops.tramontane.prefill_attention_here()):
        raise SystemExit("needs the C++ kernels on a CPU with AVX512-BF16")
    print(f"kernels: {kernels.instruction_set()} loops on {kernels.parallel_threads()} threads",
          flush=True)
    torch.manual_seed(0)
    one_layer(args.repeats)
    native, _ = ensure_checkpoints(Path(args.model_dir))
    first_prompts(native, Path(args.model_dir) / "quantized", args.precisions.split(","),
                  args.repeats)


if __name__ == "__main__":
    main()
