"""Prefill and decode speed of this engine against Hugging Face transformers, on the CPU.

One random ~200M-parameter Mistral (dim 1024, 12 layers, 16 heads / 4 kv heads, hidden 3072,
vocab 32768) is written once in both layouts (native for us, HF for transformers: same weights)
and run in each dtype asked for. What is timed, for both sides alike:

- prefill: one forward pass over the prompt that fills the KV cache and computes the logits of
  the last token only. Ours: `EndEvent.prefill_seconds` of `engine.stream` (max_tokens=1).
  Transformers: `model(ids, use_cache=True, logits_to_keep=1)`, which is exactly the prefill
  `generate` runs (it also sets logits_to_keep=1), without generate's set-up around it.
- decode (batch 1): greedy generation of N+1 tokens; the clock runs from the first generated
  token (prefill done, token sampled) to the last, i.e. N one-token steps, each a forward pass
  plus argmax and bookkeeping. Ours: timestamps of `engine.stream`'s TokenEvents (eos_id=-1).
  Transformers: timestamps of a streamer's `put` calls in `generate(do_sample=False,
  min_new_tokens=max_new_tokens=N+1)` (its default dynamic cache, SDPA attention).

Every measurement is warmed up first (the first bf16 pass per shape is slow) and the median of
several repeats is reported. Also measured: the memory bandwidth (a large tensor sum = read
bandwidth, and a copy), the weight bytes each decode token must read (all parameters but the
embedding table, which is a gather; the output projection included), and the share of the
bandwidth limit each decode rate reaches: tok/s * bytes_per_token / bandwidth.

    .venv/bin/python benchmarks/decode.py [--quick] [--dtypes float32,bfloat16]
        [--model-dir DIR] [--json PATH] [--fast]

`--fast` adds a row for `engine.fast_decode.FastDecoder` (compiled one-token step), driven by
a loop here that mirrors engine/generate.py's greedy decode loop.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import engine
from engine.tiny import random_state_dict, tiny_config, write_checkpoint

SHAPE = dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=3072)
TOKENIZER = "v3"
SEED = 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Set-up


def ensure_checkpoints(root: Path) -> tuple[Path, Path]:
    """Write (once) the random model in both layouts under `root`; return (native, hf)."""
    native, hf = root / "native", root / "hf"
    config = tiny_config(TOKENIZER, **SHAPE)  # type: ignore[arg-type]
    if not (native / "consolidated.safetensors").exists() or \
            not (hf / "model.safetensors").exists():
        t0 = time.perf_counter()
        state = random_state_dict(config, seed=SEED, dtype=torch.float32)
        write_checkpoint(native, config, state, layout="native", tokenizer=TOKENIZER)
        write_checkpoint(hf, config, state, layout="hf", tokenizer=TOKENIZER)
        del state
        print(f"wrote the random model to {root} in {time.perf_counter() - t0:.1f}s")
    return native, hf


@contextlib.contextmanager
def model_root(model_dir: str | None) -> Iterator[Path]:
    if model_dir:
        path = Path(model_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
            yield Path(tmp)


def measure_bandwidth(repeats: int = 7) -> dict[str, float]:
    """Read bandwidth (sum of a 1 GiB float32 tensor) and copy bandwidth (read + write), GB/s."""
    n = 1 << 28  # 1 GiB of float32, far beyond any cache
    src = torch.rand(n)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    read = nbytes / timed(src.sum) / 1e9
    copy = 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9
    del src, dst
    return {"read_gbps": read, "copy_gbps": copy}


def decode_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table."""
    return sum(p.numel() * p.element_size() for name, p in module.named_parameters()
               if not name.endswith(("tok_embeddings.weight", "embed_tokens.weight")))


def median_of(fn: Callable[[], float], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(repeats))


# ---------------------------------------------------------------------------------------------
# Our engine


def ours_prefill_seconds(model: engine.Model, prompt: list[int]) -> float:
    end = None
    for event in engine.stream(prompt, model, engine.SamplingParams(max_tokens=1), eos_id=-1):
        if isinstance(event, engine.EndEvent):
            end = event
    assert end is not None and end.prompt_tokens == len(prompt)
    return end.prefill_seconds


def ours_decode(model: engine.Model, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """Seconds for `steps` decode steps after the first token, and all steps + 1 tokens."""
    stamps, tokens = [], []
    for event in engine.stream(prompt, model, engine.SamplingParams(max_tokens=steps + 1),
                               eos_id=-1):
        if isinstance(event, engine.TokenEvent):
            stamps.append(time.perf_counter())
            tokens.append(event.token)
    assert len(tokens) == steps + 1
    return stamps[-1] - stamps[0], tokens


def fast_decode(decoder: Any, model: engine.Model, prompt: list[int],
                steps: int) -> tuple[float, list[int]]:
    """Like `ours_decode`, with the decode steps run by a `FastDecoder` (greedy, batch 1)."""
    with torch.inference_mode():
        cache = decoder.cache
        cache.reset()
        tokens_t = torch.tensor([prompt])
        positions = torch.arange(len(prompt))[None]
        logits = model.forward(tokens_t, positions, cache,
                               output_index=torch.tensor([len(prompt) - 1]))
        stamps, tokens = [], []
        for step in range(steps + 1):
            next_token = torch.argmax(logits, dim=-1)
            torch.log_softmax(logits.float(), dim=-1).gather(-1, next_token[:, None])
            tokens.append(int(next_token[0]))
            stamps.append(time.perf_counter())
            if step == steps:
                break
            logits = decoder.step(next_token, torch.tensor([len(prompt) + step]))
    return stamps[-1] - stamps[0], tokens


# ---------------------------------------------------------------------------------------------
# Transformers


class _Stamps:
    """A transformers streamer that records when each batch of new tokens arrives."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_prefill_seconds(model: Any, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        elapsed = time.perf_counter() - t0
    assert out.logits.shape[1] == 1
    return elapsed


def hf_decode(model: Any, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    streamer = _Stamps()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=steps + 1, min_new_tokens=steps + 1, streamer=streamer,
                         pad_token_id=0, temperature=None, top_p=None, top_k=None)
    new = out[0, len(prompt):].tolist()
    assert len(new) == steps + 1 and len(streamer.stamps) == steps + 1
    return streamer.stamps[-1] - streamer.stamps[0], new


# ---------------------------------------------------------------------------------------------
# Driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    quick = args.quick
    prefill_lengths = [512] if quick else [512, 2048]
    decode_prompt = 128
    steps = 32 if quick else 128
    repeats = 1 if quick else 3
    gen = torch.Generator().manual_seed(1)
    vocab = tiny_config(TOKENIZER).vocab_size
    prompts = {n: torch.randint(100, vocab, (n,), generator=gen).tolist()
               for n in {*prefill_lengths, decode_prompt}}

    results: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
        "decode_prompt_tokens": decode_prompt, "decode_steps": steps, "repeats": repeats,
        "rows": [],
    }
    bw = measure_bandwidth()
    results["bandwidth"] = bw
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory bandwidth: "
          f"read {bw['read_gbps']:.1f} GB/s (1 GiB sum), copy {bw['copy_gbps']:.1f} GB/s")

    with model_root(args.model_dir) as root:
        native, hf = ensure_checkpoints(root)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            row: dict[str, Any] = {"dtype": dtype_name}
            # --- ours
            model = engine.load(native, dtype=dtype_name)
            row["params"] = model.num_parameters()
            row["decode_weight_bytes"] = decode_weight_bytes(model.module)
            for n in prefill_lengths:
                s = median_of(lambda n=n: ours_prefill_seconds(model, prompts[n]), 1, repeats)
                row[f"ours_prefill_{n}"] = n / s
            times: list[float] = []
            ours_tokens: list[int] = []
            for i in range(1 + repeats):
                t, ours_tokens = ours_decode(model, prompts[decode_prompt], steps)
                if i:
                    times.append(t)
            row["ours_decode"] = steps / statistics.median(times)
            if args.fast:
                from engine.fast_decode import FastDecoder

                t0 = time.perf_counter()
                decoder = FastDecoder(model, batch_size=1, max_seq_len=decode_prompt + steps + 1)
                fast_tokens: list[int] = []
                fast_decode(decoder, model, prompts[decode_prompt], steps)  # compiles
                row["fast_compile_seconds"] = time.perf_counter() - t0
                times = []
                for _ in range(repeats):
                    t, fast_tokens = fast_decode(decoder, model, prompts[decode_prompt], steps)
                    times.append(t)
                row["fast_decode"] = steps / statistics.median(times)
                row["fast_tokens_match_ours"] = sum(
                    a == b for a, b in zip(fast_tokens, ours_tokens, strict=True))
                del decoder
            del model
            gc.collect()
            # --- transformers
            hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype).eval()
            row["hf_attention"] = hf_model.config._attn_implementation
            for n in prefill_lengths:
                s = median_of(lambda n=n: hf_prefill_seconds(hf_model, prompts[n]), 1, repeats)
                row[f"hf_prefill_{n}"] = n / s
            times = []
            hf_tokens: list[int] = []
            for i in range(1 + repeats):
                t, hf_tokens = hf_decode(hf_model, prompts[decode_prompt], steps)
                if i:
                    times.append(t)
            row["hf_decode"] = steps / statistics.median(times)
            row["tokens_match"] = sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True))
            del hf_model
            gc.collect()
            results["rows"].append(row)
            print_row(row, prefill_lengths, steps, bw, args.fast)
    return results


def print_row(row: dict[str, Any], prefill_lengths: list[int], steps: int,
              bw: dict[str, float], fast: bool) -> None:
    nbytes = row["decode_weight_bytes"]
    limit = bw["read_gbps"] * 1e9 / nbytes
    print(f"\n== {row['dtype']}: {row['params'] / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB of "
          f"weights read per decode token -> bandwidth limit {limit:.1f} tok/s "
          f"(transformers attention: {row['hf_attention']})")
    print(f"{'measurement':<34}{'ours':>10}{'transformers':>14}{'ours/tf':>9}"
          f"{'bw share ours':>15}{'bw share tf':>13}")
    for n in prefill_lengths:
        a, b = row[f"ours_prefill_{n}"], row[f"hf_prefill_{n}"]
        print(f"{f'prefill {n} tok (tok/s)':<34}{a:>10.1f}{b:>14.1f}{a / b:>8.2f}x")
    a, b = row["ours_decode"], row["hf_decode"]
    print(f"{'decode batch 1 (tok/s)':<34}{a:>10.2f}{b:>14.2f}{a / b:>8.2f}x"
          f"{a / limit:>14.0%}{b / limit:>13.0%}")
    if fast:
        f = row["fast_decode"]
        print(f"{'decode batch 1, FastDecoder (tok/s)':<34}{f:>10.2f}{b:>14.2f}{f / b:>8.2f}x"
              f"{f / limit:>14.0%}{b / limit:>13.0%}")
        print(f"FastDecoder: compile + first run {row['fast_compile_seconds']:.1f}s; greedy "
              f"tokens equal to eager: {row['fast_tokens_match_ours']}/{steps + 1}")
    print(f"greedy decode tokens equal to transformers': {row['tokens_match']}/{steps + 1}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        type=lambda s: [d.strip() for d in s.split(",") if d.strip()])
    parser.add_argument("--quick", action="store_true",
                        help="fewer tokens and repeats: a smoke run of a minute or two")
    parser.add_argument("--model-dir", help="write/reuse the random checkpoints here")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--fast", action="store_true",
                        help="also time engine.fast_decode.FastDecoder")
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype {bad[0]!r}; choose from {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    results = run(args)
    results["wall_seconds"] = time.perf_counter() - t0
    print(f"\ntotal {results['wall_seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
