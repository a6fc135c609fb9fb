"""A CPU model's weights and KV caches on 2 MiB pages (Linux transparent huge pages).

A decode step reads every weight once: on the CPU its speed is the speed at which memory
streams. With the weights on 4 KiB pages, that stream crosses a page every 4 KiB, and each
crossing costs a TLB entry and stops the hardware prefetchers of some CPUs, which never cross a
page; on 2 MiB pages it crosses one every 2 MiB. Measured on a Zen 4 VM (2 vCPU): a plain
float32 sum read at 1.1-1.7x its 4 KiB-page rate, and the decode step of a 200M model ran at
1.04-1.18x in bfloat16, 1.16x in int8, 1.10x in int4 (with the kernels' software prefetch
tuned: 4 KiB ahead, their distance until then, was a hindrance on 2 MiB pages there;
`kernels.tune_stream_ahead` measures it).

Kernels allocate with `malloc`, whose pages the kernel makes huge only where the system says
`always` (`/sys/kernel/mm/transparent_hugepage/enabled`); most distributions say `madvise`.
So `to_huge_pages` moves a model's large tensors into one private anonymous mapping advised
with `MADV_HUGEPAGE` before it is touched (a shared one would be shmem, which these settings do
not cover), each tensor on a 4 KiB boundary. Where the kernel has no huge pages to give (the
setting is `never`, memory is fragmented), the same mapping holds them on 4 KiB pages, as
before. Elsewhere than Linux, nothing moves.
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import os
import sys
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
# Tensors below this stay where they are (norms, biases, scales of small layers): not worth a
# page boundary each.
MIN_BYTES = 1 << 20
ALIGN = 4096
# TRAMONTANE_HUGE_PAGES=0 leaves the weights where loading put them and the caches on malloc's
# memory (benchmarks compare both).
ENV = "TRAMONTANE_HUGE_PAGES"


def enabled() -> bool:
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
            and os.environ.get(ENV, "1") != "0")


Key = tuple[int, torch.dtype, tuple[int, ...]]


def huge_page_memory(nbytes: int) -> torch.Tensor:
    """`nbytes` of untouched memory (uint8) that starts on a 2 MiB boundary, in a private
    anonymous mapping advised for 2 MiB pages (Linux; `enabled()` says whether it can be had).
    The mapping lives as long as a tensor made from this one does. OSError if refused."""
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(area, dtype=torch.uint8)  # holds `area` while a tensor uses it
    start = -memory.data_ptr() % HUGE_PAGE
    return memory[start:start + nbytes]


def _tensors(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor, Key]]:
    """Every parameter and buffer of `module` worth moving: (owner, name, tensor, what it is:
    its address, dtype and shape, the same for a tensor that two modules share)."""
    found = []
    for owner in module.modules():
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if (tensor is not None and tensor.device.type == "cpu" and tensor.is_contiguous()
                    and tensor.numel() * tensor.element_size() >= MIN_BYTES):
                key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
                found.append((owner, name, tensor, key))
    return found


def _views(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype],
           align: int) -> list[torch.Tensor]:
    """Tensors of these shapes and dtypes, one after the other in one `huge_page_memory`
    mapping, each starting on an `align`-byte boundary (untouched: zeros). OSError if the
    mapping is refused."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes,
                                                                          strict=True)]
    aligned = [-(-size // align) * align for size in sizes]
    memory = huge_page_memory(sum(aligned))
    starts = itertools.accumulate(aligned[:-1], initial=0)
    return [memory[start:start + size].view(dtype).view(shape)
            for start, size, shape, dtype in zip(starts, sizes, shapes, dtypes, strict=True)]


def zeros(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
          device: torch.device | str) -> list[torch.Tensor]:
    """Zeroed tensors of these shapes. On the CPU, when they come to 2 MiB or more (a KV
    cache's keys and values, which a decode step reads as it reads the weights: a bfloat16
    step at 1.9k positions took 0.95-0.96x the time on the Zen 4 VM, int4 0.99x), views of one
    mapping advised for 2 MiB pages, each on a 64-byte boundary (fresh anonymous memory reads
    as zeros: nothing is written until used); elsewhere `torch.zeros`."""
    nbytes = sum(math.prod(shape) for shape in shapes) * dtype.itemsize
    if torch.device(device).type == "cpu" and enabled() and nbytes >= HUGE_PAGE:
        try:
            return _views(shapes, [dtype] * len(shapes), 64)
        except OSError as e:
            log.info("a cache stays on malloc's pages: %s", e)
    return [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]


def to_huge_pages(module: torch.nn.Module) -> int:
    """Move `module`'s large CPU parameters and buffers onto memory advised for 2 MiB pages,
    in place (the same tensors in the same modules, their values unchanged; a tensor two
    modules share stays shared). Returns the bytes moved (0 where nothing can move)."""
    if not enabled():
        return 0
    found = _tensors(module)
    unique = {key: tensor for _, _, tensor, key in found}  # in order, a shared one once
    if not unique:
        return 0
    try:
        targets = _views([tuple(t.shape) for t in unique.values()],
                         [t.dtype for t in unique.values()], ALIGN)
    except OSError as e:  # no memory for it, or madvise refused: they stay where they are
        log.info("weights stay on the pages they have: %s", e)
        return 0
    moved = dict(zip(unique, targets, strict=True))
    for target, tensor in zip(targets, unique.values(), strict=True):
        target.copy_(tensor)
    for owner, name, _, key in found:
        if name in owner._parameters:
            parameter = owner._parameters[name]
            assert parameter is not None
            parameter.data = moved[key]
        else:
            owner._buffers[name] = moved[key]
    total = sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in targets)
    log.debug("%.0f MB of weights moved onto memory advised for 2 MiB pages", total / 1e6)
    return total
