"""Which attention kernel runs: the one place that chooses.

Block-diagonal attention: several independent sequences packed into one, each attending only to
itself (a vision encoder's images; later, a batch of prompts of unequal lengths without padding).

- On CUDA with xformers installed (the `gpu` extra), one `memory_efficient_attention` call with
  a `BlockDiagonalMask`: a single kernel over the packed sequence, no mask in memory.
- Elsewhere (the CPU, what the tests run), one `scaled_dot_product_attention` per sequence,
  without a mask: PyTorch's CPU flash kernel then needs no (T, T) score matrix, and the work is
  the sum of each sequence's square rather than the square of their sum. A dense (N, N)
  boolean mask over 16 screenshots of 4096 patches would take 4 GiB; per-sequence calls take
  nothing beyond their output. The price is one call per sequence (a handful for images).

xformers has no CPU kernel ("No operator found"), so it is never tried on the CPU. It is imported
on first use and only on CUDA; nothing changes at import time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def _xformers_ops() -> Any:
    """xformers' `ops` module, or None when it is not installed (the CPU-only install)."""
    try:
        from xformers import ops  # type: ignore[import-not-found]
    except ImportError:
        return None
    log.info("attention: xformers memory-efficient kernels on CUDA")
    return ops


def uses_xformers(device: torch.device) -> bool:
    """Whether block-diagonal attention on `device` runs xformers' kernel."""
    return device.type == "cuda" and _xformers_ops() is not None


def block_diagonal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             seqlens: Sequence[int]) -> torch.Tensor:
    """Non-causal attention within each of the packed sequences of lengths `seqlens`.

    q, k, v: (N, H, hd) with N = sum(seqlens); returns (N, H, hd). Scale 1/sqrt(hd).
    """
    if sum(seqlens) != q.shape[0]:
        raise ValueError(f"sequence lengths {list(seqlens)} do not add up to {q.shape[0]}")
    if uses_xformers(q.device):
        ops = _xformers_ops()
        bias = ops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(seqlens))
        out = ops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)
        return out[0]  # type: ignore[no-any-return]
    outputs = []
    start = 0
    for n in seqlens:
        # (1, H, n, hd): SDPA's layout
        qs, ks, vs = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
        start += n
    return torch.cat(outputs) if len(outputs) != 1 else outputs[0]
