"""The machine's read bandwidth, the reference of the benchmarks' bandwidth shares: the sum of a
1 GiB float32 tensor, on ordinary (malloc'd, 4 KiB) pages and on memory advised for 2 MiB pages
(`engine.arch.pages`, where a loaded model's weights are), the best of the two. On a Zen 4 VM
the same sum read at 1.1-1.3x on 2 MiB pages: a share against the 4 KiB figure alone would
credit the decode step with the pages' gain.
"""

from __future__ import annotations

import statistics
import time

import torch

from engine.arch import pages

GiB = 1 << 30


def read_bandwidth(repeats: int = 5) -> dict[str, float]:
    """GB/s: `read_4k` (malloc'd memory), `read_2m` (huge-page memory; absent where it cannot be
    had) and `read` (the better of the two), each the median of `repeats` sums."""
    plain = torch.ones(GiB // 4)
    result = {"read_4k": _sum_rate(plain, repeats)}
    del plain
    if pages.enabled():
        huge = pages.huge_page_memory(GiB).view(torch.float32)
        huge.fill_(1.0)
        result["read_2m"] = _sum_rate(huge, repeats)
    result["read"] = max(result.values())
    return result


def _sum_rate(x: torch.Tensor, repeats: int) -> float:
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * x.element_size() / statistics.median(times) / 1e9
