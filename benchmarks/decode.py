"""Prefill and decode speed of this engine against Hugging Face transformers, on the CPU.

One random ~200M-parameter Mistral (dim 1024, 12 layers, 16 heads / 4 kv heads, hidden 3072,
vocab 32768) is written once in both layouts (native for us, HF for transformers: the same
weights) and run in each dtype asked for. With `--archs`, also (benchmarks/bench_models.py says
why these shapes): a random Mixtral of the same active size (8 experts of hidden 1536, top-2:
~552M parameters, ~212M per token) against transformers' `MixtralForCausalLM`, and a random ~200M
Mamba2 (dim 1024, 16 layers, d_state 128, head_dim 64, expand 2, 8 groups) against
`Mamba2ForCausalLM` (its torch path: no CUDA kernels on a CPU). What is timed, for every side
alike:

- prefill: one forward pass over the prompt that fills the KV cache and computes the logits of
  the last token only. Ours: `EndEvent.prefill_seconds` of `engine.stream` (max_tokens=1).
  Transformers: `model(ids, use_cache=True, logits_to_keep=1)`, the very prefill `generate`
  runs (it also passes logits_to_keep=1), without generate's set-up around it.
- decode, batch 1: greedy generation of N+1 tokens after a 128-token prompt; the clock runs
  from the first generated token (prefill done, token chosen) to the last, i.e. N one-token
  steps, each a forward pass plus argmax and bookkeeping. Ours: timestamps of `engine.stream`'s
  TokenEvents (eos_id=-1). Transformers: timestamps of a streamer's `put` calls in
  `generate(do_sample=False, min_new_tokens=max_new_tokens=N+1)` (its default dynamic cache,
  SDPA attention, its default experts implementation for Mixtral). FastDecoder (dense only: it
  refuses MoE and Mamba2): the same `engine.stream` after `engine.enable_fast_decode` (the
  engine's loop then runs each decode step through the fast step: the native C++ step where the
  kernels are built, the compiled graph otherwise or with `TRAMONTANE_NATIVE_STEP=0`).

The MoE and Mamba2 models are timed on prefill 512 only (dense: 512 and 2048). In bfloat16,
transformers' Mamba2 keeps A_log, D and dt_bias in bfloat16 too; ours keeps them in float32.

Fairness on a shared machine: every measurement is warmed up first (the first bfloat16 pass of
each shape is slow), the sides are interleaved within each repeat, the median of the repeats is
reported, and a sample during which other processes kept more than `--max-foreign` cores busy
(from /proc/stat) is retried. The table shows the worst such load among the samples kept.

Also measured: memory bandwidth (a 1 GiB tensor sum = read bandwidth; and a copy), the weight
bytes one decode token reads (every parameter but the embedding table, which is a gather; the
output projection included; of a mixture of experts, the 2 experts a token uses; Mamba2's
recurrent state, ~17 MB in float32, is not counted), and the share of that bandwidth limit each
decode rate reaches: tok/s * bytes_per_token / read bandwidth, measured again just before each
dtype's decode samples (it moves with what else runs on the host). The compiled graph's compile
time is reported cold (empty inductor cache, a first launch) and warm (cache filled, a later
launch; the native step compiles nothing),
with its agreement with the eager path: greedy tokens, and log-probs of the eager tokens fed
back (teacher forced).

    .venv/bin/python benchmarks/decode.py [--quick] [--dtypes float32,bfloat16]
        [--archs dense,moe,mamba2] [--model-dir DIR] [--json PATH] [--no-fast]
        [--max-foreign 0.25]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bandwidth import read_bandwidth
from bench_models import (
    ARCHS,
    TOKENIZER,
    Arch,
    active_parameters,
    decode_weight_bytes,
    ensure_checkpoints,  # also edit_trace.py's way to the dense model
    model_root,
)

import engine
from engine.checkpoints.tiny import tiny_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DECODE_PROMPT = 128
# One decoder serves every request up to this length; attention reads only the slots in use.
FAST_MAX_SEQ_LEN = 4096


# ---------------------------------------------------------------------------------------------
# Measuring on a shared machine


def _busy_seconds() -> float | None:
    """CPU-seconds all processes spent busy since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Sampler:
    """Runs timed samples, retrying those during which other processes were busy."""

    max_foreign: float
    tries: int = 4
    worst_kept: float = 0.0
    retried: int = 0
    log: list[float] = field(default_factory=list)

    def __call__(self, fn: Callable[[], Any]) -> Any:
        best: tuple[float, Any] | None = None
        for attempt in range(self.tries):
            b0, o0, w0 = _busy_seconds(), _own_seconds(), time.perf_counter()
            result = fn()
            wall = time.perf_counter() - w0
            b1 = _busy_seconds()
            if b0 is None or b1 is None:
                return result
            foreign = max(0.0, (b1 - b0) - (_own_seconds() - o0)) / wall
            if best is None or foreign < best[0]:
                best = (foreign, result)
            if foreign <= self.max_foreign:
                break
            if attempt < self.tries - 1:
                self.retried += 1
                time.sleep(2.0)
        assert best is not None
        self.worst_kept = max(self.worst_kept, best[0])
        self.log.append(best[0])
        return best[1]


def measure_bandwidth(repeats: int = 7) -> dict[str, float]:
    """Read bandwidth (bandwidth.py: a 1 GiB float32 sum, the better of 4 KiB and 2 MiB pages;
    each apart too) and copy bandwidth (read + write), GB/s."""
    read = read_bandwidth(repeats)
    src = torch.rand(1 << 28)  # 1 GiB, far beyond any cache
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

    copy = 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9
    return {"read_gbps": read["read"], "read_4k_gbps": read["read_4k"],
            "read_2m_gbps": read.get("read_2m", read["read_4k"]), "copy_gbps": copy}


# ---------------------------------------------------------------------------------------------
# The three sides


def ours_prefill_seconds(model: engine.Model, prompt: list[int]) -> float:
    end = None
    for event in engine.stream(prompt, model, engine.SamplingParams(max_tokens=1), eos_id=-1):
        if isinstance(event, engine.EndEvent):
            end = event
    assert end is not None and end.prompt_tokens == len(prompt)
    return end.prefill_seconds


def ours_decode(model: engine.Model, prompt: list[int],
                steps: int) -> tuple[float, list[int], list[float]]:
    """Seconds of `steps` decode steps after the first token; all steps + 1 tokens, log-probs."""
    stamps, tokens, logprobs = [], [], []
    for event in engine.stream(prompt, model, engine.SamplingParams(max_tokens=steps + 1),
                               eos_id=-1):
        if isinstance(event, engine.TokenEvent):
            stamps.append(time.perf_counter())
            tokens.append(event.token)
            logprobs.append(event.logprob)
    assert len(tokens) == steps + 1
    return stamps[-1] - stamps[0], tokens, logprobs


def fast_decode(decoder: Any, model: engine.Model, prompt: list[int], steps: int,
                forced: list[int] | None = None) -> tuple[float, list[int], list[float]]:
    """`ours_decode` with `model.decoder` set, so `engine.stream` decodes with the compiled step.

    With `forced`, feeds those tokens instead of the argmax, step by step through the decoder
    (to compare its log-probs with the eager path's on the same sequence); not timed then.
    """
    if forced is None:
        model.decoder = decoder
        try:
            return ours_decode(model, prompt, steps)
        finally:
            model.decoder = None
    tokens, logprobs = [], []
    with torch.inference_mode():
        cache = decoder.new_cache()
        logits = model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache,
                               output_index=torch.tensor([len(prompt) - 1]))
        for step in range(steps + 1):
            next_token = torch.tensor([forced[step]])
            logprob = torch.log_softmax(logits, dim=-1).gather(-1, next_token[:, None])
            tokens.append(int(next_token[0]))
            logprobs.append(float(logprob[0, 0]))
            if step < steps:
                logits = decoder.step(next_token, torch.tensor([len(prompt) + step]), cache)
    return 0.0, tokens, logprobs


class _Stamps:
    """A transformers streamer that records when each new token arrives."""

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


def hf_logprobs(model: Any, prompt: list[int], tokens: list[int]) -> list[float]:
    """Transformers' log-probs of `tokens` after `prompt`, from one forward pass."""
    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens[:-1]])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens)[:, None])
    return picked[:, 0].tolist()


def build_fast(model: engine.Model, cold: bool) -> tuple[Any, dict[str, float]]:
    """A FastDecoder, and its compile times: cold (empty inductor cache, as at a first launch)
    then warm (cache filled, as at a later launch), or as found."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    from engine.runtime.compiled import FastDecoder

    if os.environ.get("TRAMONTANE_NATIVE_STEP", "1") != "0":
        try:  # the C++ step (runtime/native.py), as the server takes it: nothing to compile
            return FastDecoder(model, batch_size=1, max_seq_len=FAST_MAX_SEQ_LEN,
                               native=True), {"native": 1.0}
        except engine.EngineError:
            pass  # the compiled graph, whose compile is timed
    times: dict[str, float] = {}
    if not cold:
        decoder = FastDecoder(model, batch_size=1, max_seq_len=FAST_MAX_SEQ_LEN)
        times["compile_seconds"] = decoder.compile_seconds
        return decoder, times
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache_dir, \
            temporary_cache_dir(cache_dir):
        torch._dynamo.reset()
        decoder = FastDecoder(model, batch_size=1, max_seq_len=FAST_MAX_SEQ_LEN)
        times["compile_cold_seconds"] = decoder.compile_seconds
        del decoder
        gc.collect()
        torch._dynamo.reset()  # forget the compiled code in memory; the disk cache stays
        decoder = FastDecoder(model, batch_size=1, max_seq_len=FAST_MAX_SEQ_LEN)
        times["compile_warm_seconds"] = decoder.compile_seconds
    return decoder, times


# ---------------------------------------------------------------------------------------------
# Driver


def run_dtype(arch: Arch, dtype_name: str, native: Path, hf: Path,
              prompts: dict[int, list[int]], prefill_lengths: list[int], steps: int,
              repeats: int, fast: bool, quick: bool, sample: Sampler) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    row: dict[str, Any] = {"arch": arch.name, "dtype": dtype_name}
    model = engine.load(native, dtype=dtype_name)
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=DTYPES[dtype_name]).eval()
    assert type(hf_model).__name__ == arch.hf_class, type(hf_model).__name__
    row["params"] = model.num_parameters()
    row["active_params"] = active_parameters(model.module, model.config)
    row["decode_weight_bytes"] = decode_weight_bytes(model.module, model.config)
    row["hf_class"] = arch.hf_class
    row["hf_attention"] = getattr(hf_model.config, "_attn_implementation", None)
    if arch.name == "moe":
        row["hf_experts"] = getattr(hf_model.config, "_experts_implementation", None)

    for n in prefill_lengths:
        ours_prefill_seconds(model, prompts[n])  # warm-up
        hf_prefill_seconds(hf_model, prompts[n])
        ours_s, hf_s = [], []
        for _ in range(repeats):
            ours_s.append(sample(functools.partial(ours_prefill_seconds, model, prompts[n])))
            hf_s.append(sample(functools.partial(hf_prefill_seconds, hf_model, prompts[n])))
        row[f"ours_prefill_{n}"] = n / statistics.median(ours_s)
        row[f"hf_prefill_{n}"] = n / statistics.median(hf_s)

    prompt = prompts[DECODE_PROMPT]
    decoder = None
    if fast:
        decoder, times = build_fast(model, cold=not quick)
        row.update(times)
    ours_decode(model, prompt, steps)  # warm-up
    hf_decode(hf_model, prompt, steps)
    if decoder is not None:
        fast_decode(decoder, model, prompt, steps)
    # Bandwidth moves with what else runs on the host: measure it next to the decode samples.
    row["bandwidth"] = sample(measure_bandwidth)
    times_by: dict[str, list[float]] = {"ours": [], "hf": [], "fast": []}
    ours_tokens: list[int] = []
    ours_logprobs: list[float] = []
    hf_tokens: list[int] = []
    fast_tokens: list[int] = []
    for _ in range(repeats):
        t, ours_tokens, ours_logprobs = sample(lambda: ours_decode(model, prompt, steps))
        times_by["ours"].append(t)
        if decoder is not None:
            t, fast_tokens, _ = sample(lambda: fast_decode(decoder, model, prompt, steps))
            times_by["fast"].append(t)
        t, hf_tokens = sample(lambda: hf_decode(hf_model, prompt, steps))
        times_by["hf"].append(t)
    for side, ts in times_by.items():
        if ts:
            row[f"{side}_decode"] = steps / statistics.median(ts)
    row["hf_tokens_match"] = sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True))
    row["hf_max_logprob_diff"] = max(
        abs(a - b) for a, b in zip(ours_logprobs, hf_logprobs(hf_model, prompt, ours_tokens),
                                   strict=True))
    if decoder is not None:
        row["fast_tokens_match"] = sum(
            a == b for a, b in zip(ours_tokens, fast_tokens, strict=True))
        _, _, forced_logprobs = fast_decode(decoder, model, prompt, steps, forced=ours_tokens)
        row["fast_max_logprob_diff"] = max(
            abs(a - b) for a, b in zip(ours_logprobs, forced_logprobs, strict=True))
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quick = args.quick
    prefill_lengths = [512] if quick else [512, 2048]
    steps = 32 if quick else 128
    repeats = 1 if quick else 3
    gen = torch.Generator().manual_seed(1)
    vocab = tiny_config(TOKENIZER).vocab_size
    prompts = {n: torch.randint(100, vocab, (n,), generator=gen).tolist()
               for n in sorted({*prefill_lengths, DECODE_PROMPT})}
    sample = Sampler(max_foreign=args.max_foreign, tries=2 if quick else 4)

    bw = measure_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory bandwidth: "
          f"read {bw['read_gbps']:.1f} GB/s (1 GiB sum; 4 KiB pages {bw['read_4k_gbps']:.1f}, "
          f"2 MiB pages {bw['read_2m_gbps']:.1f}), copy {bw['copy_gbps']:.1f} GB/s")
    results: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
        "decode_prompt_tokens": DECODE_PROMPT, "decode_steps": steps, "repeats": repeats,
        "bandwidth": bw, "rows": [],
    }
    with model_root(args.model_dir) as root:
        for name in args.archs:
            arch = ARCHS[name]
            native, hf = ensure_checkpoints(root, name)
            # MoE and Mamba2: the short prompt only (the long one adds minutes, little news).
            lengths = prefill_lengths if name == "dense" else prefill_lengths[:1]
            for dtype_name in args.dtypes:
                row = run_dtype(arch, dtype_name, native, hf, prompts, lengths, steps, repeats,
                                args.fast and name == "dense", quick, sample)
                row["worst_foreign_load"] = sample.worst_kept
                sample.worst_kept = 0.0
                results["rows"].append(row)
                print_row(row, arch, lengths, steps)
                gc.collect()
    results["bandwidth_end"] = measure_bandwidth()
    results["retried_samples"] = sample.retried
    if len(args.archs) > 1:
        print_summary(results["rows"], steps)
    print(f"\nread bandwidth at the end: {results['bandwidth_end']['read_gbps']:.1f} GB/s; "
          f"samples retried for other processes' load: {sample.retried}")
    return results


def print_row(row: dict[str, Any], arch: Arch, prefill_lengths: list[int], steps: int) -> None:
    nbytes = row["decode_weight_bytes"]
    read = row["bandwidth"]["read_gbps"]
    limit = read * 1e9 / nbytes
    params = f"{row['params'] / 1e6:.1f}M parameters"
    if arch.name == "dense":  # the header it always had
        title = row["dtype"]
    else:
        title = f"{arch.name} ({arch.title}), {row['dtype']}"
        if row["active_params"] != row["params"]:
            params += f" ({row['active_params'] / 1e6:.1f}M per token)"
    print(f"\n== {title}: {params}, {nbytes / 1e6:.0f} MB of "
          f"weights read per decode token; read bandwidth {read:.1f} GB/s (measured before the "
          f"decode samples) -> limit {limit:.1f} tok/s")
    print(f"{'tokens/s':<32}{'ours':>9}{'transformers':>14}{'ours/tf':>9}{'% of bw limit':>15}")
    for n in prefill_lengths:
        a, b = row[f"ours_prefill_{n}"], row[f"hf_prefill_{n}"]
        print(f"{f'prefill {n} tokens':<32}{a:>9.1f}{b:>14.1f}{a / b:>8.2f}x")
    hf_rate = row["hf_decode"]
    label = f"decode batch 1 ({steps} steps)"
    shares = f"{row['ours_decode'] / limit:>8.0%} / {hf_rate / limit:.0%}"
    print(f"{label:<32}{row['ours_decode']:>9.2f}{hf_rate:>14.2f}"
          f"{row['ours_decode'] / hf_rate:>8.2f}x{shares:>15}")
    if "fast_decode" in row:
        f = row["fast_decode"]
        print(f"{'decode batch 1, FastDecoder':<32}{f:>9.2f}{hf_rate:>14.2f}{f / hf_rate:>8.2f}x"
              f"{f / limit:>8.0%}")
        compile_note = ("none (the native step)" if "native" in row
                        else f"cold {row['compile_cold_seconds']:.1f}s, warm "
                        f"{row['compile_warm_seconds']:.1f}s" if "compile_cold_seconds" in row
                        else f"{row['compile_seconds']:.1f}s (inductor cache as found)")
        print(f"FastDecoder (max_seq_len {FAST_MAX_SEQ_LEN}): compile {compile_note}")
    if arch.name == "dense":
        reference = f"{row['hf_attention']} attention"
    elif arch.name == "moe":
        reference = (f"{row['hf_class']}: {row['hf_attention']} attention, "
                     f"{row['hf_experts']} experts")
    else:
        reference = f"{row['hf_class']}: torch path"
    print(f"prefill: ours = engine.stream's prefill_seconds, transformers = one forward with "
          f"use_cache=True, logits_to_keep=1 ({reference})")
    agree = (f"agreement with our eager decode ({steps + 1} greedy tokens; max |d logprob| of "
             f"our tokens, fed back): transformers {row['hf_tokens_match']} tokens, "
             f"{row['hf_max_logprob_diff']:.2g}")
    if "fast_decode" in row:
        agree += (f"; FastDecoder {row['fast_tokens_match']} tokens, "
                  f"{row['fast_max_logprob_diff']:.2g}")
    print(agree)
    print(f"other processes' load during the samples kept: <= {row['worst_foreign_load']:.2f} "
          f"cores")


def print_summary(rows: list[dict[str, Any]], steps: int) -> None:
    """Batch-1 decode of every architecture and dtype, one line each."""
    print(f"\n== decode batch 1 ({steps} steps), tokens/s")
    print(f"{'model':<32}{'ours':>9}{'transformers':>14}{'ours/tf':>9}{'tokens agree':>15}")
    for row in rows:
        label = f"{row['arch']}, {row['dtype']}"
        a, b = row["ours_decode"], row["hf_decode"]
        agree = f"{row['hf_tokens_match']}/{steps + 1}"
        print(f"{label:<32}{a:>9.2f}{b:>14.2f}{a / b:>8.2f}x{agree:>15}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        type=lambda s: [d.strip() for d in s.split(",") if d.strip()])
    parser.add_argument("--archs", default="dense,moe,mamba2",
                        type=lambda s: [a.strip() for a in s.split(",") if a.strip()],
                        help="models to run: dense (Mistral), moe (Mixtral), mamba2")
    parser.add_argument("--quick", action="store_true",
                        help="fewer tokens and repeats, no cold compile: a smoke run")
    parser.add_argument("--model-dir", help="write the random checkpoints here, or reuse them")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="skip engine.runtime.compiled.FastDecoder (dense only in any case)")
    parser.add_argument("--max-foreign", type=float, default=0.25,
                        help="retry a sample if other processes kept more cores busy than this")
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype {bad[0]!r}; choose from {', '.join(DTYPES)}")
    bad = [a for a in args.archs if a not in ARCHS]
    if bad or not args.archs:
        parser.error(f"unknown architecture {(bad or [''])[0]!r}; choose from "
                     f"{', '.join(ARCHS)}")
    t0 = time.perf_counter()
    results = run(args)
    results["wall_seconds"] = time.perf_counter() - t0
    print(f"total {results['wall_seconds']:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
