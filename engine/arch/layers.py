"""Building blocks of the decoder: linear layers, RMSNorm, rotary embedding, feed-forward,
attention."""

from __future__ import annotations

import functools
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .attention import chunk_attention
from .cache import AttentionPlan, KVCache
from .config import TransformerConfig


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX): oneDNN's
    bfloat16 kernels are fast there and emulated elsewhere."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# Rows from which a bfloat16 product on a CPU without bfloat16 instructions runs in float32.
UPCAST_ROWS = 16


def few_rows(x: torch.Tensor) -> bool:
    """Whether `x` has at most `kernels.MAX_ROWS` rows: the C++ kernels' share of products."""
    return x.numel() <= kernels.MAX_ROWS * x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias), fast for one row (decode) and for many (prefill).

    One row reads every weight once: its speed is memory traffic. With a bfloat16 weight on
    the CPU it is the C++ kernel `tramontane::gemv_bf16` (`kernels.py`), eagerly and in the
    compiled step alike (86% of one thread's read bandwidth against 50-60% for the paths
    below), and so are up to `kernels.MAX_ROWS` rows (a keystroke's few new prompt tokens):
    the weights streamed once for all of them, where oneDNN's emulated bfloat16 product took
    10-20x longer for 2-4 rows on the AVX2 machine here. Otherwise, under `torch.compile`, one
    row is a broadcast multiply and a float32
    sum over the input dimension, which inductor turns into one vectorised, threaded loop over
    the weight rows (faster than oneDNN's packed kernels, no packed copy of the weights); it
    accumulates in float32 like the eager matmul and rounds to the input's dtype.

    Many rows in bfloat16 on a CPU without bfloat16 instructions (AVX2, AVX-512 without BF16):
    float32 copies and a float32 matmul, 6x faster than oneDNN's emulated bfloat16 kernel at
    256 rows on the AVX2 machine here (the weight's conversion costs one pass over it; by
    panels, as `panel_rows` converts int8 and int4 weights, it was no faster). The products
    are the same up to the summation order; the result is rounded once to bfloat16.
    """
    one_row = x.numel() == x.shape[-1]
    cpu_bf16 = x.device.type == "cpu" and weight.dtype == torch.bfloat16
    if cpu_bf16 and few_rows(x) and kernels.available():
        return cast(torch.Tensor, torch.ops.tramontane.gemv_bf16(x, weight)).view(
            *x.shape[:-1], -1)
    if torch.compiler.is_compiling() and one_row:
        rows = x.reshape(1, 1, -1).float()
        return (rows * weight.float()).sum(-1).to(x.dtype).view(*x.shape[:-1], -1)
    if cpu_bf16 and x.numel() >= UPCAST_ROWS * x.shape[-1] and not native_bf16_matmul():
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


def panel_rows(x: torch.Tensor, kind: str, tensors: tuple[torch.Tensor, ...],
               group: int = 0) -> torch.Tensor:
    """`x W^T` for many rows on the CPU, in x's dtype, W an int8 or int4 weight given as its
    layer's `kernel_operands` (kind "int8", "int4"). With the C++ kernels,
    `tramontane::linear_rows` converts W by panels of ~4 MiB, each multiplied while still in
    cache; converting all of W first wrote and read back 4 bytes per weight at every call (a
    first prompt of 1530 tokens in chunks of 256, int8: 1.6 of its 6.7 s). The panels are
    bfloat16 where x is and the CPU multiplies bfloat16 natively (2.4-3.1x faster than the
    float32 panels at 256 rows on a Zen 4: each weight rounded once to bfloat16, as a bfloat16
    checkpoint's), float32 elsewhere. Without the kernels, W is converted whole."""
    rows = x.reshape(-1, x.shape[-1])
    if not (rows.dtype == torch.bfloat16 and native_bf16_matmul() and kernels.available()):
        rows = rows.float()
    if kernels.available():
        y = torch.ops.tramontane.linear_rows(rows, list(tensors), kernels.KINDS[kind], group)
    else:
        y = F.linear(rows, dequantized(kind, tensors, group))
    return cast(torch.Tensor, y).to(x.dtype).view(*x.shape[:-1], -1)


def dequantized(kind: str, tensors: tuple[torch.Tensor, ...], group: int) -> torch.Tensor:
    """The float32 weight of `panel_rows`'s operands (int4 only with the C++ kernels)."""
    if kind == "int8":
        return tensors[0].float() * tensors[1].float()[:, None]
    return cast(torch.Tensor, torch.ops.tramontane.dequantize_int4(*tensors, group))


# How a layer's one-row product runs in the C++ kernels: the kernel's name and its operands
# (`Linear.kernel_operands`; the quantized layers have their own).
KernelOperands = tuple[str, tuple[torch.Tensor, ...]]
MANY_KERNELS = {"bf16": "gemv_bf16_many", "int8": "gemv_int8_many", "int4": "gemv_int4_many"}


def linear_many(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """`[m(x) for m in modules]`, in one kernel call when x is one row on the CPU and every
    module runs the same C++ kernel (a layer's query, key and value projections; a
    feed-forward's gate and up projections): one fork and join of the threads instead of one
    per module (`products.cpp`, `for_rows`). Anything else, an adapter-wrapped layer among
    them, runs each module's own forward."""
    if few_rows(x) and x.device.type == "cpu" and kernels.available():
        plans = [m.kernel_operands() if isinstance(m, KernelLayer) else None for m in modules]
        kind = plans[0][0] if plans[0] is not None else None
        if kind is not None and all(p is not None and p[0] == kind for p in plans):
            operands = [cast(KernelOperands, p)[1] for p in plans]
            columns = [list(c) for c in zip(*operands, strict=True)]
            name, _, group = kind.partition(":")
            extra = [int(group)] if group else []  # int4's group size
            ys = getattr(torch.ops.tramontane, MANY_KERNELS[name])(x, *columns, *extra)
            return [y.view(*x.shape[:-1], -1) for y in ys]
    return [m(x) for m in modules]


class KernelLayer(nn.Module):
    """A layer whose one-row product may run in a C++ kernel together with others
    (`linear_many`)."""

    def kernel_operands(self) -> KernelOperands | None:
        """The kernel and operands of a one-row product on the CPU, or None (no kernel)."""
        raise NotImplementedError


class Linear(nn.Linear, KernelLayer):
    """A bias-free linear layer whose one-row product compiles to a weight-streaming loop
    (`linear`). Adapters (`lora.LoRALinear`) and quantized layers keep this interface: a
    module called on activations, so the compiled step needs no special case for them."""

    def __init__(self, in_features: int, out_features: int, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def kernel_operands(self) -> KernelOperands | None:
        return ("bf16", (self.weight,)) if self.weight.dtype == torch.bfloat16 else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of `positions: [B, T]`, as two `[B, T, 1, head_dim]` factors for
    `apply_rotary`: cos repeated per pair, and sin with the sign of each pair's first element.

    Angles are computed in float32 on the fly (no table sized by the longest context).
    Padding positions (-1) get angle 0: their outputs are never used.
    """
    inv_freq = rotary_inv_freq(head_dim, theta, positions.device)
    angles = positions.clamp(min=0).to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    cos, sin = cos_sin_pairs(angles, dtype)
    return cos[:, :, None, :], sin[:, :, None, :]


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The `head_dim / 2` rotation frequencies, float32: theta^(-2i / head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                            / head_dim))


def cos_sin_pairs(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles `(..., hd/2)`, one per pair, as `apply_rotary`'s factors `(..., hd)`: cos repeated
    per pair, and sin with the sign of each pair's first element."""
    cos, sin = angles.cos(), angles.sin()
    cos = cos.repeat_interleave(2, dim=-1)  # c0 c0 c1 c1 ...
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)  # -s0 s0 -s1 s1 ...
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]): Mistral's native (interleaved) layout.

    x: (B, T, H, hd). `x * cos + swap_pairs(x) * sin`, i.e. (x0 c - x1 s, x1 c + x0 s) per pair,
    in real arithmetic (bfloat16 works too) and three passes over x: on 2048 tokens this is
    about twice as fast as rotating the even and odd halves separately and interleaving them.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # x1 x0 x3 x2 ...
    return torch.addcmul(swapped * sin, x, cos)


class FeedForward(nn.Module):
    """Gated feed-forward: `w2(act(w1 x) * w3 x)`, SiLU-gated (Mistral's decoders and vision
    encoder); `activation` "gelu" for a vision config that asks for it."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu") -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)  # gate
        self.w2 = Linear(hidden_dim, dim)  # down
        self.w3 = Linear(dim, hidden_dim)  # up
        self.act = F.gelu if activation == "gelu" else F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_many(x, (self.w1, self.w3))
        return self.w2(self.act(gate) * up)


class Attention(nn.Module):
    """Grouped-query attention over the layer's slice of a `KVCache`.

    The cache decides per forward (one `AttentionPlan` per group of layers sharing a capacity)
    whether the new keys can be written before attending (always, but for chunks that would
    overwrite keys of a rotating sliding-window buffer that the chunk itself still needs) or must
    be attended as `cat(cache, new)` and written afterwards.
    """

    def __init__(self, config: TransformerConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape  # (B, T, dim)
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rotary(k, cos, sin).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.transpose(1, 2)
        keys, values = cache.update(self.layer_id, k, v, plan)
        out = chunk_attention(q, keys, values, plan.mask, plan.causal)  # (B, T, H, hd)
        return self.wo(out.reshape(bsz, seqlen, self.n_heads * self.head_dim))
