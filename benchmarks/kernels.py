"""One-row weight products (what a decode step is made of), each kernel against the read
bandwidth: inductor's broadcast-multiply-and-sum (bfloat16, int8), PyTorch's weight-only kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) and ours (`engine.arch.kernels`), with
each vector instruction set the CPU has (AVX-512 and AVX2 on an AVX-512 machine).

Eight weights of 12288 x 1024 per call (200 MB in bfloat16: far beyond the caches), timed in
thread CPU time with one thread by default (`--threads 1`): other processes on a shared machine
then do not count, and the share of the one-thread read bandwidth (a float32 sum, timed the
same way) compares kernels fairly. With more threads the clock is the wall clock.

    .venv/bin/python benchmarks/kernels.py [--threads 1] [--rows 1]

`--rows 4`: four input rows per call (a keystroke's new prompt tokens; our kernels read the
weights once for all of them, so the rows' arithmetic, not the memory, sets their speed).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from engine.arch import kernels, quant


def capped(isa: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the kernels' loops capped at `isa` (the best the CPU has, by default)."""
    def run() -> object:
        with kernels.instruction_set_capped(isa):
            return fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", type=int, default=1, help="input rows per call (1-16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter

    def timed(fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.repeats):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return sorted(times)[len(times) // 2]

    big = torch.ones(2**27)
    bandwidth = big.numel() * 4 / min(timed(big.sum) for _ in range(2)) / 1e9
    del big
    out, inp, n = 12288, 1024, 8
    torch.manual_seed(0)
    ws = [torch.randn(out, inp).to(torch.bfloat16) for _ in range(n)]
    x = torch.randn(args.rows, inp).to(torch.bfloat16)
    q8 = [quant.quantize_int8(w, torch.bfloat16) for w in ws]
    q4 = [quant.quantize_int4(w, torch.bfloat16) for w in ws]
    layers8 = [quant.build({"q8": q, "scale": s}, torch.bfloat16, "cpu") for q, s in q8]
    packed4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant.unpack_int4(p), 1)
               for p, _, _ in q4]
    sz4 = [torch.stack((s.t(), z.t()), -1).to(torch.bfloat16).contiguous() for _, s, z in q4]

    @torch.compile(fullgraph=True)
    def stream(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x.float() * w.float()).sum(-1).to(x.dtype)

    @torch.compile(fullgraph=True)
    def stream8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return ((x.float() * w.float()).sum(-1) * s).to(x.dtype)

    bytes16 = sum(w.numel() * 2 for w in ws)
    bytes8 = sum(q.numel() + s.numel() * 4 for q, s in q8)
    bytes4 = sum(p.numel() + s.numel() * 8 for p, s, _ in q4)
    rows: list[tuple[str, int, Callable[[], object]]] = [
        ("bf16, F.linear", bytes16, lambda: [torch.nn.functional.linear(x, w) for w in ws]),
        ("int8, aten._weight_int8pack_mm", bytes8,
         lambda: [torch.ops.aten._weight_int8pack_mm(x, m.q, m.scale.to(x.dtype))
                  for m in layers8]),
        ("int4, aten._weight_int4pack_mm_for_cpu", bytes4,
         lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 32, s)
                  for p, s in zip(packed4, sz4, strict=True)]),
    ]
    if args.rows == 1:  # the compiled step's one-row loops
        rows += [
            ("bf16, inductor broadcast-sum", bytes16, lambda: [stream(x, w) for w in ws]),
            ("int8, inductor broadcast-sum", bytes8, lambda: [stream8(x, q, s) for q, s in q8]),
        ]
    if kernels.available():
        x32 = torch.randn(args.rows, inp)  # not bfloat16 values: the float32 loops, not BF16's dots
        for isa in kernels.cpu_instruction_sets():
            if isa == "portable":
                continue
            rows += [
                (f"bf16, tramontane::gemv_bf16 [{isa}]", bytes16,
                 capped(isa, lambda: [torch.ops.tramontane.gemv_bf16(x, w) for w in ws])),
                (f"bf16, float32 x, tramontane [{isa}]", bytes16,
                 capped(isa, lambda: [torch.ops.tramontane.gemv_bf16(x32, w) for w in ws])),
                (f"int8, tramontane::gemv_int8 [{isa}]", bytes8,
                 capped(isa, lambda: [torch.ops.tramontane.gemv_int8(x, q, s) for q, s in q8])),
                (f"int4, tramontane::gemv_int4 [{isa}]", bytes4,
                 capped(isa, lambda: [torch.ops.tramontane.gemv_int4(x, p, s, z, 32)
                                      for p, s, z in q4])),
            ]
    else:
        print("(the C++ kernels are not built: python -m engine.arch.kernels)")
    print(f"{args.threads} thread(s), {args.rows} input row(s), load average "
          f"{os.getloadavg()[0]:.1f}; read bandwidth {bandwidth:.1f} GB/s "
          f"({'thread CPU time' if args.threads == 1 else 'wall clock'})")
    for name, nbytes, fn in rows:
        seconds = timed(fn)
        rate = nbytes / seconds / 1e9
        print(f"  {name:42} {seconds * 1e3:7.1f} ms  {rate:5.1f} GB/s  {rate / bandwidth:5.0%}")


if __name__ == "__main__":
    main()
