"""Side by side with llama.cpp (llama-cpp-python 0.3.36 built from source for this machine), on
the same random ~200M Mistral (bench_models.py's dense model), at three weight precisions:
our bfloat16 vs its bf16 GGUF, our int8 vs q8_0, our int4 vs q4_0.

Set-up, once (not part of `make test`; 15-25 minutes on 2 cores):

    bash benchmarks/llama_cpp_setup.sh          # .venv-llama: llama-cpp-python + its converter
    .venv/bin/python benchmarks/llama_cpp.py --model-dir /tmp/bench-model [--keys 120]

The GGUF files are converted from the Hugging Face copy of the checkpoint with the
`convert_hf_to_gguf.py` that ships in llama-cpp-python's source distribution (bf16 and q8_0),
and q4_0 is quantized from the bf16 file with llama.cpp's own `llama_model_quantize`. llama.cpp
runs in a worker process of its own venv (this script with `--worker`), driven over a pipe; ours
runs in this process with the compiled decode step. Each measurement alternates the two sides
(order swapped every repeat), so both see the same machine load; the load average is printed
with each table. What is timed, both sides alike:

- keystrokes: the editing trace of edit_trace.py (a function typed into textwrap.py, typos, a
  jump and back), each keystroke's FIM prompt built by the server's own `PromptBuilder`
  (1536 prefix / 512 suffix tokens, anchored windows) and encoded by mistral-common; each
  engine reuses its KV cache prefix from the previous keystroke (ours: `engine.PrefixCache`;
  llama.cpp: the longest common prefix kept in its context, the rest evaluated) and decodes
  8 greedy tokens. The first keystroke is a full prefill (reported apart, and again
  `--repeats` times per side from an empty cache, as a file opened in a running server).
  Paced: each waits for the previous one.
  With `--lookup N`, a third side replays the same keystrokes through ours with speculative
  decoding by lookup (drafts of up to N tokens, from the prompt and that side's earlier
  completions, in a prefix cache of its own; the same greedy tokens); llama.cpp has no drafts.
- prefill: 512 and 2048 prompt tokens into an empty cache, logits of the last one.
- decode: 128 greedy tokens after a 512-token prompt (from the first generated token on).

Bandwidth: a 1 GiB float32 sum (read; bandwidth.py: the better of 4 KiB and 2 MiB pages) just
before each of our decode runs; the share is that run's decode tok/s x bytes one token reads
(every weight but the embedding table, scales included) / the reading, the median over the
runs. (A single reading before a precision's
runs moved between 21 and 38 GB/s from one precision to the next on a shared host, minutes
before the decode it was set against.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETUP_VENV = HERE.parent / ".venv-llama"
LLAMA_VERSION = "0.3.36"
PRECISIONS = {"bf16": (None, "bf16"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}
LLAMA_FTYPE_MOSTLY_Q4_0 = 2


# ---------------------------------------------------------------------------------------------
# The llama.cpp worker (runs in .venv-llama: numpy and llama_cpp only)


def worker(gguf: str, threads: int, extra_bufts: bool) -> None:
    # This file is named llama_cpp.py and its folder is sys.path[0]: without this, the import
    # below would find this script instead of the package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.modules.pop("llama_cpp", None)
    import llama_cpp
    import numpy as np

    if not extra_bufts:  # a field of the low-level model params that `Llama` does not expose
        defaults = llama_cpp.llama_model_default_params

        def params() -> Any:
            p = defaults()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=4096, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()
    held: list[int] = []  # the tokens whose keys/values the context holds

    def last_logits() -> Any:  # eval() keeps no scores unless logits_all: read the context's
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def run(tokens: list[int], max_tokens: int, reuse: bool) -> dict[str, Any]:
        nonlocal held
        common = 0
        if reuse:
            while common < min(len(held), len(tokens) - 1) and held[common] == tokens[common]:
                common += 1
        t0 = time.perf_counter()
        llm.n_tokens = common  # eval() drops the cache past n_tokens first
        llm.eval(tokens[common:])
        out, stamps = [], []
        for i in range(max_tokens):
            token = int(np.argmax(last_logits()))
            out.append(token)
            stamps.append(time.perf_counter())
            if i + 1 < max_tokens:
                llm.eval([token])
        held = tokens + out[:-1]
        return {"seconds": time.perf_counter() - t0, "stamps": [s - t0 for s in stamps],
                "tokens": out, "reused": common}

    for line in sys.stdin:
        request = json.loads(line)
        reply = run(request["tokens"], request["max_tokens"], request["reuse"])
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-extra-bufts", action="store_true")
    args = parser.parse_args(argv)
    worker(args.worker, args.threads, not args.no_extra_bufts)


# ---------------------------------------------------------------------------------------------
# The driver (this project's venv)


class Llama:
    """The worker process of one GGUF file."""

    def __init__(self, python: Path, gguf: Path, extra_bufts: bool) -> None:
        command = [str(python), __file__, "--worker", str(gguf)]
        if not extra_bufts:
            command.append("--no-extra-bufts")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self, tokens: list[int], max_tokens: int, reuse: bool) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"tokens": tokens, "max_tokens": max_tokens,
                                          "reuse": reuse}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker died (exit {self.proc.wait(5)})")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def convert(venv: Path, hf: Path, out_dir: Path) -> dict[str, Path]:
    """bf16 and q8_0 GGUF files by the sdist's converter, q4_0 by llama.cpp's quantizer."""
    src = venv / "src" / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
    python = venv / "bin" / "python"
    tokenizer = hf / "tokenizer.model"
    if not tokenizer.exists():  # the converter wants sentencepiece's usual name
        (original,) = hf.glob("tokenizer.model.v*")
        tokenizer.write_bytes(original.read_bytes())
    files = {}
    for outtype in ("bf16", "q8_0"):
        path = out_dir / f"model-{outtype}.gguf"
        if not path.exists():
            done = subprocess.run([str(python), str(src / "convert_hf_to_gguf.py"), str(hf),
                                   "--outtype", outtype, "--outfile", str(path)],
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
        files[outtype] = path
    q4 = out_dir / "model-q4_0.gguf"
    if not q4.exists():
        code = (f"import llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                f"p.ftype = {LLAMA_FTYPE_MOSTLY_Q4_0}; p.nthread = 2; "
                f"r = llama_cpp.llama_model_quantize({str(files['bf16']).encode()!r}, "
                f"{str(q4).encode()!r}, p); assert r == 0, r")
        # Not from this folder: `python -c` puts the working folder first on sys.path, where
        # this file, llama_cpp.py, would stand in for the package.
        subprocess.run([str(python), "-c", code], check=True, timeout=1800, cwd=out_dir)
    files["q4_0"] = q4
    return files


def read_bandwidth() -> float:
    from bandwidth import read_bandwidth as measure

    return measure()["read"]


def load_average() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def trace_prompts(model: Any, keys: int) -> list[list[int]]:
    """The FIM prompt of each keystroke of edit_trace.py's trace, as the server builds it."""
    from edit_trace import SOURCE, build_trace

    from lsp_server.documents import Document
    from lsp_server.prompt import PromptBuilder
    from lsp_server.settings import CompletionSettings
    from lsp_server.tokenizer import PromptTokenizer

    settings = CompletionSettings()
    tokenizer = PromptTokenizer(model.tokenizer)
    builder = PromptBuilder(tokenizer.count, prefix_tokens=settings.prefix_tokens,
                            suffix_tokens=settings.suffix_tokens)
    text = SOURCE.read_text()
    prompts = []
    for version, key in enumerate(build_trace(text, 0)[:keys]):
        text = text[:key.start] + key.text + text[key.end:]
        document = Document("file:///textwrap.py", "python", version, text)
        windows = builder.build(document, key.start + len(key.text))
        prompts.append(list(tokenizer.encode_fim(windows.prefix, windows.suffix)))
    return prompts


def weight_bytes(model: Any) -> int:
    """Bytes one decode token reads: every weight but the embedding table."""
    from engine.arch import quant

    dense = sum(p.numel() * p.element_size() for n, p in model.module.named_parameters()
                if not n.endswith("tok_embeddings.weight"))
    return int(dense + quant.weight_bytes(model.module))


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def bench_precision(name: str, native: Path, gguf: Path, args: argparse.Namespace,
                    prompts: list[list[int]]) -> dict[str, Any]:
    import torch

    import engine
    from engine.arch import kernels

    quantize, _ = PRECISIONS[name]
    model = engine.load(native, dtype="bfloat16", quantize=quantize,
                        quantized_dir=Path(args.model_dir) / "quantized")
    gc.collect()
    gc.freeze()  # as the server does after a load (backends/local.py)
    t0 = time.perf_counter()
    model.decoder = engine.compile_decode_step(model, 2560, 1, 512,
                                               native=args.step == "native")
    compile_s = time.perf_counter() - t0
    llama = Llama(Path(args.llama_venv) / "bin" / "python", gguf, not args.no_extra_bufts)
    result: dict[str, Any] = {"compile_s": compile_s, "load": load_average(),
                              "repeats": args.repeats,
                              "step": args.step, "stream_ahead": kernels.stream_ahead()}
    try:
        result["weight_bytes"] = weight_bytes(model)
        sampling = engine.SamplingParams(max_tokens=8)
        # One prefix cache per side of ours: with --lookup, the second one's history is the
        # lookup side's own earlier completions.
        caches = [engine.PrefixCache(model, max_seq_len=2560, budget_bytes=2**30, rewind=512)
                  for _ in range(2 if args.lookup else 1)]
        drafts = [0, 0]  # drafted, accepted

        def ours_key(prompt: list[int], lookup: int = 0) -> float:
            t = time.perf_counter()
            events = list(engine.stream(prompt, model, sampling, eos_id=-1, chunk_size=256,
                                        prefix_cache=caches[1 if lookup else 0],
                                        cache_key="doc", lookup=lookup))
            seconds = time.perf_counter() - t
            end = events[-1]
            drafts[0] += end.drafted_tokens
            drafts[1] += end.accepted_tokens
            return seconds

        times: dict[str, list[float]] = {"ours": [], "llama": [], "lookup": []}
        for i, prompt in enumerate(prompts):
            sides = [("ours", lambda p=prompt: ours_key(p)),
                     ("llama", lambda p=prompt: llama.run(p, 8, True)["seconds"])]
            if args.lookup:
                sides.append(("lookup", lambda p=prompt: ours_key(p, args.lookup)))
            shift = i % len(sides)  # each side goes first as often as the others
            for side, fn in sides[shift:] + sides[:shift]:
                times[side].append(fn())
        ours, theirs, drafted = times["ours"], times["llama"], times["lookup"]
        result["first_prompt_tokens"] = len(prompts[0])
        result["first"] = (ours[0], theirs[0])
        result["keys"] = {"p50": (statistics.median(ours[1:]), statistics.median(theirs[1:])),
                          "p95": (p95(ours[1:]), p95(theirs[1:])), "n": len(ours) - 1}
        if args.lookup:
            result["lookup"] = {"n": args.lookup, "p50": statistics.median(drafted[1:]),
                                "p95": p95(drafted[1:]), "drafted": drafts[0],
                                "accepted": drafts[1], "tokens": 8 * len(prompts)}
        result["keys_load"] = load_average()
        # The first prompt again, from an empty cache each time (a file just opened in a
        # server that has run before): the one above is also each process's first request.
        firsts: dict[str, list[float]] = {"ours": [], "llama": []}
        for r in range(args.repeats):
            sides = [("ours", lambda: _ours_first(model, prompts[0])),
                     ("llama", lambda: llama.run(prompts[0], 8, False)["seconds"])]
            for side, fn in sides if r % 2 == 0 else reversed(sides):
                firsts[side].append(fn())
        result["first_again"] = (statistics.median(firsts["ours"]),
                                 statistics.median(firsts["llama"]))
        rng = torch.Generator().manual_seed(0)
        for length in (512, 2048):
            prompt = [1, *torch.randint(100, 30000, (length - 1,), generator=rng).tolist()]
            times: dict[str, list[float]] = {"ours": [], "llama": []}
            for r in range(args.repeats):
                sides = [("ours", lambda p=prompt: _ours_prefill(model, p)),
                         ("llama", lambda p=prompt: llama.run(p, 1, False)["seconds"])]
                for side, fn in sides if r % 2 == 0 else reversed(sides):
                    times[side].append(fn())
            result[f"prefill{length}"] = (length / statistics.median(times["ours"]),
                                          length / statistics.median(times["llama"]))
        prompt = [1, *torch.randint(100, 30000, (511,), generator=rng).tolist()]
        rates: dict[str, list[float]] = {"ours": [], "llama": []}
        readings: list[float] = []  # the read bandwidth just before each of our decode runs
        for r in range(args.repeats):
            sides = [("ours", lambda p=prompt: _ours_decode(model, p, 129)),
                     ("llama", lambda p=prompt: _llama_decode(llama, p, 129))]
            for side, fn in sides if r % 2 == 0 else reversed(sides):
                if side == "ours":
                    readings.append(read_bandwidth())
                rates[side].append(fn())
        result["decode"] = (statistics.median(rates["ours"]), statistics.median(rates["llama"]))
        result["bandwidth_gbs"] = statistics.median(readings)
        result["share"] = statistics.median(
            rate * result["weight_bytes"] / (gbs * 1e9)
            for rate, gbs in zip(rates["ours"], readings, strict=True))
        result["end_load"] = load_average()
    finally:
        llama.close()
        model.decoder = None
        gc.unfreeze()
    return result


def _ours_first(model: Any, prompt: list[int]) -> float:
    """A keystroke's 8 tokens from an empty prefix cache, in the trace's chunks of 256."""
    import engine

    cache = engine.PrefixCache(model, max_seq_len=2560, budget_bytes=2**30, rewind=512)
    t = time.perf_counter()
    list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=8), eos_id=-1,
                       chunk_size=256, prefix_cache=cache, cache_key="doc"))
    return time.perf_counter() - t


def _ours_prefill(model: Any, prompt: list[int]) -> float:
    import engine

    end = list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=1), eos_id=-1,
                             chunk_size=4096))[-1]
    return float(end.prefill_seconds)


def _ours_decode(model: Any, prompt: list[int], n: int) -> float:
    import engine

    stamps = [time.perf_counter() for event in engine.stream(
        prompt, model, engine.SamplingParams(max_tokens=n), eos_id=-1, chunk_size=4096)
        if isinstance(event, engine.TokenEvent)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _llama_decode(llama: Llama, prompt: list[int], n: int) -> float:
    stamps = llama.run(prompt, n, False)["stamps"]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def report(rows: dict[str, dict[str, Any]], cpu: str) -> None:
    print(f"\n{cpu}; ours / llama.cpp {LLAMA_VERSION}; ratios > 1 favour us for rates, < 1 for "
          "latencies")
    for name, r in rows.items():
        _, gguf = PRECISIONS[name]
        label = f"{name} vs {gguf}"
        print(f"\n{label}: load average {r['load']} at start, {r['keys_load']} after the trace, "
              f"{r['end_load']} at the end; read bandwidth {r['bandwidth_gbs']:.1f} GB/s "
              "(median, beside our decode runs); "
              f"our decode step ({r['step']}) reads {r['weight_bytes'] / 1e6:.0f} MB per "
              f"token; built in {r['compile_s']:.1f} s, prefetching "
              f"{r['stream_ahead']} bytes ahead")
        k = r["keys"]
        f = r["first"]
        (a50, b50), (a95, b95) = k["p50"], k["p95"]
        print(f"  keystroke p50 ({k['n']} keys)   {a50 * 1e3:8.0f} ms {b50 * 1e3:8.0f} ms  "
              f"ratio {a50 / b50:.2f}x")
        print(f"  keystroke p95               {a95 * 1e3:8.0f} ms {b95 * 1e3:8.0f} ms  "
              f"ratio {a95 / b95:.2f}x; our p95/p50 {a95 / a50:.2f}")
        if "lookup" in r:
            d = r["lookup"]
            print(f"  keystroke p50, ours with lookup {d['n']} (llama.cpp without) "
                  f"{d['p50'] * 1e3:5.0f} ms {b50 * 1e3:8.0f} ms  ratio {d['p50'] / b50:.2f}x; "
                  f"{d['p50'] / a50:.2f}x ours without")
            print(f"  keystroke p95, ours with lookup {d['n']}     {d['p95'] * 1e3:8.0f} ms "
                  f"{b95 * 1e3:8.0f} ms  ratio {d['p95'] / b95:.2f}x; drafted "
                  f"{d['drafted']} tokens of {d['tokens']}, accepted {d['accepted']}")
        print(f"  first prompt ({r['first_prompt_tokens']} tokens)   {f[0]:8.2f} s  {f[1]:8.2f} s"
              f"   ratio {f[0] / f[1]:.2f}x")
        g = r["first_again"]
        print(f"  first prompt again, empty cache, median of {r['repeats']} "
              f"{g[0]:6.2f} s  {g[1]:8.2f} s   ratio {g[0] / g[1]:.2f}x")
        for key in ("prefill512", "prefill2048", "decode"):
            a, b = r[key]
            print(f"  {key:27} {a:8.1f} tok/s {b:6.1f} tok/s  ratio {a / b:.2f}x")
        print(f"  our decode: {r['share']:.0%} of the read bandwidth")


def main() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="the random model and GGUF files")
    parser.add_argument("--llama-venv", default=str(SETUP_VENV))
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--keys", type=int, default=120, help="keystrokes of the trace")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-extra-bufts", action="store_true",
                        help="llama.cpp without its extra buffer types (its AMX path died "
                             "with SIGILL on a virtual CPU reporting AMX)")
    parser.add_argument("--step", choices=("native", "graph"), default="native",
                        help="our decode step: the C++ layers (runtime/native.py) or the "
                             "compiled graph (runtime/compiled.py)")
    parser.add_argument("--lookup", type=int, default=0,
                        help="also replay the trace through ours with speculative decoding by "
                             "lookup, up to this many drafted tokens a pass (llama.cpp's side "
                             "runs without drafts)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from bench_models import ensure_checkpoints

    import engine

    root = Path(args.model_dir)
    native, hf = ensure_checkpoints(root)
    files = convert(Path(args.llama_venv), hf, root)
    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    prompts = trace_prompts(engine.load(native), args.keys)
    print(f"{cpu}, {os.cpu_count()} cores; {len(prompts)} keystrokes, prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens", flush=True)
    rows = {}
    for name in args.precisions.split(","):
        print(f"{name}: running (load average {load_average()})", file=sys.stderr, flush=True)
        rows[name] = bench_precision(name, native, files[PRECISIONS[name][1]], args, prompts)
    report(rows, cpu)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
