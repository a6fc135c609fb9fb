"""Which attention kernel runs: the one place that chooses.

A decoder's chunk of new tokens over the keys its cache holds (`chunk_attention`):

- bfloat16 queries with heads of 64-256 dimensions on a CPU with AVX512-BF16: our C++ kernel
  `tramontane::prefill_attention` (`prefill_attention.cpp`: flash attention in BF16's dot
  products, 0.29-0.40x SDPA's time for the 256-token chunks of a 1.5k-token prompt on a Zen 4,
  with SDPA's errors against a float64 reference: `benchmarks/prefill_attention.py`,
  tests/engine/test_prefill_kernels.py);
- anything else, SDPA: its `is_causal` kernel for a plain causal first chunk, else the mask.

Block-diagonal attention (`block_diagonal_attention`): several independent sequences packed
into one, each attending only to itself (a vision encoder's images; later, a batch of prompts
of unequal lengths without padding).

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

from . import kernels

log = logging.getLogger(__name__)


def bf16_attention(q: torch.Tensor) -> bool:
    """Whether a chunk's attention runs in `tramontane::prefill_attention`: bfloat16 queries
    `(B, H, T, hd)` on a CPU with AVX512-BF16 (the kernels' instruction set not capped below
    it), heads of 64-256 dimensions in steps of 64."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[-1] % 64 == 0
            and q.shape[-1] <= 256 and kernels.available()
            and bool(torch.ops.tramontane.prefill_attention_here()))


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    allowed: torch.Tensor, causal: bool) -> torch.Tensor:
    """A decoder chunk's grouped-query attention: q `(B, H, T, hd)` over keys and values
    `(B, Hkv, K, hd)` where `allowed` `(B, 1, T, K)` says (`causal`: the mask is plain causal
    over K == T keys). Returns `(B, T, H, hd)`; scale 1/sqrt(hd)."""
    if bf16_attention(q):
        return torch.ops.tramontane.prefill_attention(  # type: ignore[no-any-return]
            q, keys, values, allowed, q.shape[-1] ** -0.5)
    gqa = q.shape[1] != keys.shape[1]
    if causal:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, enable_gqa=gqa)
    return out.transpose(1, 2)


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
