"""The C++ kernels of the decode step (`torch.ops.tramontane.*`): building, loading, and the
pure-PyTorch paths used where they are not built.

- `kernels.cpp`: the ops of one-row products of bfloat16, int8 and int4 weights (`gemv_*`),
  and their `_many` forms, several weights of the same input row in one call
  (`layers.linear_many`), computed by `products.cpp` (their loops are in `product_loops.h`,
  portable and AVX2, and `product_loops_avx512.h`; the threads share the rows by
  `row_shares.h`); and the instruction sets, prefetch distance and row sharing they run with.
- `decode_attention.cpp`: one new token per row written into the key/value cache, and its
  grouped-query attention over the slots in use.
- `decode_layer.cpp`: a dense decoder's one-token step in three ops (`decode_slots`,
  `decode_layer`, `decode_logits`), built on the two above (`products.h` is what they share).
- `decode_step.cpp`: the same step as one call, `torch.classes.tramontane.DecodeStep`, which
  holds the weights; `runtime/native.py` builds and runs it.
- `prefill_attention.cpp`: a prompt chunk's attention over the keys it may see, in
  bfloat16's dot products where the CPU has them (`prefill_attention`).
- `prefill_linear.cpp`: many rows (a prompt's chunk) times a bfloat16, int8 or int4 weight in
  the rows' float32 or bfloat16, the weight converted by panels that stay in cache
  (`linear_rows`), and the int4 weight in float32 (`dequantize_int4`).

Why a C++ extension: decoding one token streams every weight once, and on the AVX2 CPUs here
neither inductor's loops nor PyTorch's kernels stream at the memory limit. Measured with one
thread (thread CPU time, so that other processes on the shared machine do not count; a
12288 x 1024 weight per call, `benchmarks/kernels.py` repeats it), as a share of that thread's
read bandwidth (a float32 sum): inductor's broadcast-multiply-and-sum over bfloat16 ~50%;
`aten._weight_int8pack_mm` ~35% of it in int8 bytes; `aten._weight_int4pack_mm_for_cpu` ~20%
in int4 bytes; inductor's own int8 loop ~8% (its AVX2 int8-to-float conversion is the
bottleneck). These kernels: see the benchmark and README's Performance section. Their loops
come in three instruction sets, chosen at run time (`instruction_set`): portable C++, AVX2 +
FMA, and AVX-512 with VNNI (and BF16's dot products where the CPU has them), whose dot
products make a keystroke's few prompt rows 0.55-0.75x the AVX2 loops' time on a Zen 4.

Built once at install (`make` runs `python -m engine.arch.kernels`; ~1 minute, needs a C++
compiler and the `ninja` package), into torch's extension cache (`~/.cache/torch_extensions`).
At run time the built library is loaded if it is there (torch rebuilds it if a source
changed); if it is not, nothing is compiled behind the user's back: the fallbacks run, and one
log line says how to build. `TRAMONTANE_KERNELS=0` forces the fallbacks (tests compare both).
Built with OpenMP, so that a product's rows go to torch's threads; a compiler without it gets
the library for one thread (a `no-openmp` file in the build folder remembers it).

The ops have shapes registered for torch.compile (`register_fake`): the compiled decode step
calls them as extern kernels (per layer: query, key and value in one call, the output
projection, gate and up in one call, down; then the attention).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "tramontane_kernels"
# The most input rows a product call takes (`kMaxInputRows` in products.h): it streams the weights
# once for all of them, so a prompt that grew by a few tokens costs about one decode step.
# Beyond, a matmul is faster (the kernels' loops are per input row).
MAX_ROWS = 16
HERE = Path(__file__).parent
# The weight kinds the C++ ops take (`decode_layer`'s `kinds`, `linear_rows`'s `kind`: `Kind` in
# products.h).
KINDS = {"bf16": 0, "int8": 1, "int4": 2, "f32": 3}
# The one-row products, the decode step's attention, the fused decoder layer built on both,
# the whole step as one object, and the many-row products of a prompt's chunk; `simd.h` and
# `products.h` are shared, `product_loops*.h` and `attention_loops.h` hold the loops,
# `input_rows.h` the input rows as the product loops read them.
SOURCES = (HERE / "kernels.cpp", HERE / "products.cpp", HERE / "decode_attention.cpp",
           HERE / "decode_layer.cpp", HERE / "decode_step.cpp", HERE / "prefill_linear.cpp",
           HERE / "prefill_attention.cpp")
# What the sources include (the compiler tracks them; `cache_tag` and the package data too).
HEADERS = tuple(sorted(HERE.glob("*.h")))
_state: dict[str, bool] = {}


def _build_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(NAME, verbose=False))


# A build holds a `lock` file in the build folder while it runs (~1 minute); one older than this
# was left by a build that was killed, and torch would wait for it forever.
STALE_LOCK_S = 15 * 60


# `at::parallel_for` shares a product's rows among torch's threads only in code compiled with
# OpenMP (it is a header template around `#pragma omp parallel`); without the flag every kernel
# ran on the calling thread: measured, two threads took exactly as long as one. The library
# then needs libgomp.so.1, which the one torch loads (its own copy, same soname) provides: one
# thread pool for torch and the kernels.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove the build folder's lock if a killed build left it (older than `STALE_LOCK_S`):
    otherwise every later load, a language server's start included, waits on it for ever."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    log.warning("removing %s, left %.0f min ago by a kernel build that did not finish", lock,
                age / 60)
    lock.unlink(missing_ok=True)
    return True


# Left in the build folder when the compiler could not build with OpenMP: later builds and
# loads go straight to the one-thread library (holds the compiler's complaint).
NO_OPENMP = "no-openmp"


def build(verbose: bool = False) -> None:
    """Compile (or load, when up to date) the library and register its ops. A compiler without
    OpenMP gets the library for one thread (every product on the calling thread), said once
    in the log, rather than no library at all."""
    from torch.utils.cpp_extension import load

    build_dir = _build_dir()
    clear_stale_lock(build_dir)
    openmp = OPENMP if not (build_dir / NO_OPENMP).exists() else []

    def load_with(flags: list[str]) -> None:
        load(name=NAME, sources=[str(p) for p in SOURCES], extra_cflags=["-O3", *flags],
             extra_ldflags=flags, extra_include_paths=[str(HERE)], is_python_module=False,
             verbose=verbose)

    try:
        load_with(openmp)
    except (RuntimeError, subprocess.SubprocessError) as e:
        if not openmp or compiler_takes_openmp():
            raise  # not OpenMP's failure: the compiler's own message, unchanged
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("the C++ kernels did not build with OpenMP (%s): building them for one "
                    "thread", why)
        load_with([])
        # Only now: a failure that was not OpenMP's failed again just above.
        (build_dir / NO_OPENMP).write_text(f"{e}\n(remove this file to try OpenMP again)\n")
    _register_fakes()


def compiler_takes_openmp() -> bool:
    """Whether the compiler torch builds with (`CXX`, else `c++`) compiles and links a small
    OpenMP program: tells a compiler without OpenMP from an error in the kernels' sources."""
    source = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                [os.environ.get("CXX", "c++"), *OPENMP, "-x", "c++", "-", "-o",
                 str(Path(tmp) / "probe")], input=source, capture_output=True, text=True,
                timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def _register_fakes() -> None:
    @torch.library.register_fake("tramontane::gemv_bf16")  # type: ignore[misc]
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.numel() // w.shape[1], w.shape[0])

    @torch.library.register_fake("tramontane::gemv_int8")  # type: ignore[misc]
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.numel() // q.shape[1], q.shape[0])

    @torch.library.register_fake("tramontane::gemv_int4")  # type: ignore[misc]
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
          group: int) -> torch.Tensor:
        return x.new_empty(x.numel() // (2 * q.shape[1]), q.shape[0])

    @torch.library.register_fake("tramontane::gemv_bf16_many")  # type: ignore[misc]
    def _(x: torch.Tensor, ws: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.new_empty(x.numel() // w.shape[1], w.shape[0]) for w in ws]

    @torch.library.register_fake("tramontane::gemv_int8_many")  # type: ignore[misc]
    def _(x: torch.Tensor, qs: list[torch.Tensor],
          scales: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.new_empty(x.numel() // q.shape[1], q.shape[0]) for q in qs]

    @torch.library.register_fake("tramontane::gemv_int4_many")  # type: ignore[misc]
    def _(x: torch.Tensor, qs: list[torch.Tensor], scales: list[torch.Tensor],
          zeros: list[torch.Tensor], group: int) -> list[torch.Tensor]:
        return [x.new_empty(x.numel() // (2 * q.shape[1]), q.shape[0]) for q in qs]

    @torch.library.register_fake("tramontane::dequantize_int4")  # type: ignore[misc]
    def _(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
          group: int) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1] * 2, dtype=torch.float32)

    @torch.library.register_fake("tramontane::linear_rows")  # type: ignore[misc]
    def _(x: torch.Tensor, tensors: list[torch.Tensor], kind: int, group: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], tensors[0].shape[0])

    @torch.library.register_fake("tramontane::prefill_attention")  # type: ignore[misc]
    def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
          scale: float) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @torch.library.register_fake("tramontane::decode_attention")  # type: ignore[misc]
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
          values: torch.Tensor, slot: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return q.new_empty(q.shape, dtype=torch.float32)


@functools.cache
def cache_tag() -> str:
    """A digest of the kernels' sources and of this file (their registered shapes): part of the
    key under which torch.compile caches a compiled step, so that a step compiled against
    other kernels is never loaded from the cache."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS, Path(__file__)):
        digest.update(path.read_bytes())
    return f"tramontane-kernels-{digest.hexdigest()[:16]}"


def available() -> bool:
    """Whether the C++ ops are loaded (loading them the first time this is asked)."""
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if os.environ.get("TRAMONTANE_KERNELS", "1") == "0":
        log.info("TRAMONTANE_KERNELS=0: the pure-PyTorch kernels run")
    elif not (_build_dir() / f"{NAME}.so").exists():
        log.info("the C++ decode kernels are not built (`python -m engine.arch.kernels` builds "
                 "them): the pure-PyTorch ones run")
    else:
        try:
            build()
            ok = True
        # compiler, ninja or loader trouble (a compiler that fails `--version`: a subprocess error)
        except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
            log.warning("the C++ decode kernels could not be loaded (%s): the pure-PyTorch "
                        "ones run", e)
    _state["ok"] = ok
    return ok


def instruction_set() -> str:
    """Which loops the kernels run here, chosen at run time: "avx512" (AVX-512 with VNNI, and
    BF16's dot products where the CPU has them), "avx2" (AVX2 + FMA) or "portable". They differ
    in how int4 products take their activations: the vector loops round them to int8 per group
    of 32 (one scale per group), the portable ones keep them in float32."""
    return str(torch.ops.tramontane.instruction_set())


def cpu_instruction_sets() -> list[str]:
    """The instruction sets whose loops this CPU runs, best first (ending with "portable")."""
    return [str(name) for name in torch.ops.tramontane.cpu_instruction_sets()]


@contextlib.contextmanager
def instruction_set_capped(name: str) -> Iterator[str]:
    """Run the loops of `name` or lower in every kernel inside the block (the tests and the
    benchmarks compare the sets in one process); yields the set that runs."""
    before = str(torch.ops.tramontane.cap_instruction_set(name))
    try:
        yield instruction_set()
    finally:
        torch.ops.tramontane.cap_instruction_set(before)


def set_stream_ahead(nbytes: int) -> int:
    """How far ahead (bytes; 0: not at all) the loops that stream a weight prefetch it, from
    now on, in every kernel of the library; returns the distance before."""
    return int(torch.ops.tramontane.set_stream_ahead(nbytes))


def stream_ahead() -> int:
    """The loops' prefetch distance now, in bytes (0: none)."""
    ahead = set_stream_ahead(0)
    set_stream_ahead(ahead)
    return ahead


def set_balanced_rows(on: bool) -> bool:
    """Whether the products' threads take rows from each other's shares when their own is done
    (row_shares.h; on by default), from now on; returns what was set before."""
    return bool(torch.ops.tramontane.set_balanced_rows(on))


# The prefetch distances `tune_stream_ahead` tries (bytes; 0: none), and how many passes each.
STREAM_AHEAD_CHOICES = (0, 512, 1024, 2048, 4096, 8192)
TUNE_ROUNDS = 3


def tune_stream_ahead(run: Callable[[], object],
                      choices: Sequence[int] = STREAM_AHEAD_CHOICES,
                      rounds: int = TUNE_ROUNDS) -> tuple[int, dict[int, float]]:
    """Set the prefetch distance at which `run` (the products of one pass over a model's
    weights, more bytes than the caches hold) is fastest here, and return it with each
    distance's best time in seconds. The distances take turns, in both orders, so a machine
    that slows down midway slows them alike. Which one wins depends on the CPU and on the pages
    the weights are on (simd.h's `stream_ahead` has the figures); the results of the products
    do not."""
    best = dict.fromkeys(choices, math.inf)
    run()  # the first pass pays for whatever is cold
    for r in range(rounds):
        for ahead in choices if r % 2 == 0 else reversed(choices):
            set_stream_ahead(ahead)
            start = time.perf_counter()
            run()
            best[ahead] = min(best[ahead], time.perf_counter() - start)
    chosen = min(choices, key=lambda ahead: best[ahead])
    set_stream_ahead(chosen)
    return chosen, best


def parallel_threads() -> int:
    """How many threads a kernel's rows are shared among (torch's intra-op threads, if the
    library was built with OpenMP)."""
    return int(torch.ops.tramontane.parallel_threads())


def main() -> int:
    """`python -m engine.arch.kernels`: build the library now (the Makefile runs this)."""
    try:
        build(verbose="-v" in sys.argv)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
        print(f"engine.arch.kernels: not built ({e}); the pure-PyTorch kernels will run",
              file=sys.stderr)
        return 1
    print(f"engine.arch.kernels: built in {_build_dir()} ({instruction_set()} loops, "
          f"{parallel_threads()} threads)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
