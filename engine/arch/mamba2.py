"""Mamba2 (Codestral Mamba): the network in plain PyTorch (its config: config.py; its state:
recurrent.py).

A Mamba2 layer replaces attention by a selective state-space model (SSM). Per head h, with a
state `S` of shape (head_dim, d_state) and the token's input `x` (head_dim), `B`, `C` (d_state)
and step `dt`:

    S <- exp(dt * A_h) * S + dt * x B^T          y = S C + D_h x

Prompts go through the chunked form of that recurrence (the "state space duality" scan): within
a chunk of `chunk_size` tokens the outputs are a masked, decayed attention-like product computed
with matrix multiplications; between chunks only the state is carried. Generated tokens take the
recurrent form above: one constant-time step per token, whatever the length so far.

The state of a sequence is therefore constant in size: the last `d_conv - 1` inputs of the
causal convolution and the SSM state, per layer (`recurrent.MambaCache`). Padding tokens
(position -1) get `dt = 0` and `x = 0`, which leaves the SSM state exactly as it was, and the
convolution state keeps the row's last real inputs, so ragged batches and chunked prefill are
exact.

Module names follow the checkpoint keys (native keys without their `model.` prefix), so a
state dict loads as it is. A fused CUDA scan (`mamba_ssm`) is used only when it is installed
and the tensors are on a GPU; the PyTorch path is the reference and the CPU path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import MambaConfig
from .layers import Linear, RMSNorm
from .recurrent import MambaCache

# ---------------------------------------------------------------------------------------------
# The scan (prefill) and the step (decode)


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """`a: (..., Q)` -> `(..., Q, Q)` with out[l, s] = a[s+1] + ... + a[l] for l >= s, -inf above
    the diagonal. Summing each range directly (not as a difference of two running sums) keeps
    small decays exact when the running sums are large."""
    q = a.shape[-1]
    lower = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()  # [l, s]: l >= s
    strictly_lower = lower.tril(-1)
    terms = a[..., :, None].expand(*a.shape, q).masked_fill(~strictly_lower, 0.0)  # [k, s]
    return terms.cumsum(dim=-2).masked_fill(~lower, -math.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, a_neg: torch.Tensor, b: torch.Tensor,
             c: torch.Tensor, state: torch.Tensor, chunk_size: int,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM over a sequence, chunk by chunk, from `state`; all float32.

    x: (B, T, H, P); dt: (B, T, H) (0 for padding); a_neg: (H,) (negative); b, c: (B, T, G, N);
    state: (B, H, P, N). Returns y (B, T, H, P) without the D term, and the final state.
    Heads h of group g are h = g * (H // G) + r, as in the reference layer.
    """
    bsz, seqlen, n_heads, p = x.shape
    groups, n = b.shape[2], b.shape[3]
    r = n_heads // groups
    s = state.view(bsz, groups, r, p, n)
    xdt = (x * dt[..., None]).view(bsz, seqlen, groups, r, p)
    log_decay = (dt * a_neg).view(bsz, seqlen, groups, r).permute(0, 2, 3, 1)  # (B, G, R, T)
    outputs = []
    for start in range(0, seqlen, chunk_size):
        sl = slice(start, start + chunk_size)
        xc, bc, cc, ac = xdt[:, sl], b[:, sl], c[:, sl], log_decay[..., sl]
        decay = _segment_sums(ac).exp()  # (B, G, R, L, S): token s's decay by the time of l
        from_start = ac.cumsum(dim=-1)  # (B, G, R, L): log-decay since the chunk's start
        # Inside the chunk: attention-like scores C_l . B_s per group, decayed and causal.
        scores = torch.einsum("blgn,bsgn->bgls", cc, bc)
        y = torch.einsum("bgrls,bsgrp->blgrp", scores[:, :, None] * decay, xc)
        # What the state carried into the chunk contributes.
        y = y + torch.einsum("blgn,bgrpn->blgrp", cc, s) * \
            from_start.exp().permute(0, 3, 1, 2)[..., None]
        outputs.append(y)
        # The state at the chunk's end: the old one decayed, plus each token decayed to the end.
        to_end = decay[..., -1, :].permute(0, 3, 1, 2)[..., None]  # (B, S, G, R, 1)
        s = s * from_start[..., -1].exp()[..., None, None] + \
            torch.einsum("bsgrp,bsgn->bgrpn", xc * to_end, bc)
    y = torch.cat(outputs, dim=1).reshape(bsz, seqlen, n_heads, p)
    return y, s.reshape(bsz, n_heads, p, n)


def ssm_step(x: torch.Tensor, dt: torch.Tensor, a_neg: torch.Tensor, b: torch.Tensor,
             c: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One token of the recurrence, updating `state` (B, H, P, N) in place: x (B, H, P),
    dt (B, H), b, c (B, G, N). Returns y (B, H, P) without the D term.

    Constant time in the length: three passes over the state (decay, rank-one update, read-out),
    in place. For Codestral Mamba that is 3 x 256 MiB per token, beside 14.6 GB of weights.
    """
    bsz, n_heads, p = x.shape
    groups, n = b.shape[1], b.shape[2]
    rows = bsz * n_heads
    s = state.view(rows, p, n)
    s.mul_((dt * a_neg).exp().view(rows, 1, 1))
    per_head = (bsz, groups, n_heads // groups, n)
    b_heads = b[:, :, None].expand(per_head).reshape(rows, 1, n)
    s.baddbmm_((x * dt[..., None]).reshape(rows, p, 1), b_heads)
    c_heads = c[:, :, None].expand(per_head).reshape(rows, n, 1)
    return torch.bmm(s, c_heads).view(bsz, n_heads, p)


@functools.cache
def _cuda_kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """mamba_ssm's fused scan and step, if installed (looked up at the first CUDA forward)."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined, selective_state_update


# ---------------------------------------------------------------------------------------------
# The network


class GatedRMSNorm(nn.Module):
    """RMSNorm of `y * silu(z)`, normalised per group of `dim / n_groups` channels (the
    reference's norm_before_gate=False); float32 inside, float32 out."""

    def __init__(self, dim: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.n_groups = n_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y.float() * F.silu(z.float())).unflatten(-1, (self.n_groups, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2)


class Mamba2Mixer(nn.Module):
    """in_proj -> causal depthwise conv (x, B, C) -> SSM -> gated RMSNorm -> out_proj."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.in_proj = Linear(c.dim, c.d_inner + c.conv_dim + c.n_heads)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads))
        self.A_log = nn.Parameter(torch.empty(c.n_heads))
        self.D = nn.Parameter(torch.empty(c.n_heads))
        self.norm = GatedRMSNorm(c.d_inner, c.n_groups, c.norm_eps)
        self.out_proj = Linear(c.d_inner, c.dim)

    def _conv(self, xbc: torch.Tensor, conv_state: torch.Tensor,
              counts: torch.Tensor) -> torch.Tensor:
        """Causal depthwise convolution continuing `conv_state` (updated in place).

        xbc: (B, T, conv_dim) -> (B, T, conv_dim) after SiLU. The new state is the last
        d_conv - 1 inputs before each row's padding: slots counts[b] .. counts[b] + d_conv - 2
        of the state followed by the chunk.
        """
        width, seqlen = conv_state.shape[-1], xbc.shape[1]
        seq = torch.cat((conv_state, xbc.transpose(1, 2)), dim=-1)  # (B, C, d_conv - 1 + T)
        # A sum of d_conv shifted products: for one token, much faster than F.conv1d (whose
        # oneDNN call costs milliseconds of set-up), and no slower for a prompt.
        w, bias = self.conv1d.weight[:, 0], self.conv1d.bias  # (C, d_conv), (C,)
        assert bias is not None
        out = bias[:, None] + seq[..., :seqlen] * w[:, :1]
        for k in range(1, width + 1):
            out = out + seq[..., k:k + seqlen] * w[:, k:k + 1]
        index = (counts[:, None] + torch.arange(width, device=seq.device))[:, None, :]
        conv_state.copy_(seq.gather(2, index.expand(-1, seq.shape[1], -1)))
        return F.silu(out).transpose(1, 2)

    def forward(self, h: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor,
                conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        c = self.config
        bsz, seqlen, _ = h.shape  # (B, T, dim)
        z, xbc, dt = self.in_proj(h).split([c.d_inner, c.conv_dim, c.n_heads], dim=-1)
        xbc = self._conv(xbc, conv_state, counts)
        x, b, cmat = xbc.float().split([c.d_inner, c.n_groups * c.d_state,
                                        c.n_groups * c.d_state], dim=-1)
        mask = valid.to(torch.float32)[..., None]  # (B, T, 1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if c.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*c.dt_limit)
        dt = dt * mask  # padding: no decay, no input; the state stays as it was
        x = (x * mask).view(bsz, seqlen, c.n_heads, c.head_dim)
        b = b.view(bsz, seqlen, c.n_groups, c.d_state)
        cmat = cmat.view(bsz, seqlen, c.n_groups, c.d_state)
        a_neg = -self.A_log.float().exp()
        kernels = _cuda_kernels() if h.is_cuda else None
        if seqlen == 1 and kernels is not None:
            heads = (c.n_heads, c.head_dim, c.d_state)
            y = kernels[1](ssm_state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, c.head_dim),
                           a_neg[:, None, None].expand(heads), b[:, 0], cmat[:, 0])[:, None]
        elif seqlen == 1:
            y = ssm_step(x[:, 0], dt[:, 0], a_neg, b[:, 0], cmat[:, 0], ssm_state)[:, None]
        elif kernels is not None:
            y, new_state = kernels[0](x, dt, a_neg, b, cmat, c.chunk_size,
                                      initial_states=ssm_state, return_final_states=True)
            ssm_state.copy_(new_state)
        else:
            y, new_state = ssd_scan(x, dt, a_neg, b, cmat, ssm_state, c.chunk_size)
            ssm_state.copy_(new_state)
        y = y + x * self.D.float()[:, None]
        y = self.norm(y.reshape(bsz, seqlen, c.d_inner), z)
        return self.out_proj(y.to(h.dtype))  # type: ignore[no-any-return]


class Mamba2Block(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = Mamba2Mixer(config)

    def forward(self, h: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor,
                conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        residual = h.float() if self.residual_in_fp32 else h
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), valid, counts, conv_state,
                         ssm_state)
        return residual + out  # type: ignore[no-any-return]


class Mamba2Backbone(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.dim)
        self.layers = nn.ModuleList(Mamba2Block(config) for _ in range(config.n_layers))
        self.norm_f = RMSNorm(config.dim, config.norm_eps)


class Mamba2(nn.Module):
    """The language model: `backbone` (embedding, blocks, final norm) and `lm_head`."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Mamba2Backbone(config)
        self.lm_head = Linear(config.dim, config.padded_vocab_size)

    def new_cache(self, batch_size: int, max_seq_len: int, *, rewind: int = 0,
                  device: torch.device | str, dtype: torch.dtype) -> MambaCache:
        """A recurrent state: constant in size, no rewind (it is snapshotted instead)."""
        return MambaCache(self.config, batch_size, max_seq_len, device=device, dtype=dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: MambaCache,
        output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `tokens: (B, T)` at `positions: (B, T)` (-1 = padding, at the end of rows only)
        from the state in `cache`, which they must continue; the state is updated in place.

        Returns float32 logits `(B, T, V)`, or `(B, V)` at `output_index: (B,)`; V is the
        tokenizer's vocabulary (the padding rows of the embedding are never predicted).
        """
        counts = cache.advance(positions)
        valid = positions >= 0
        h = self.backbone.embedding(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.backbone.layers):
            h = layer(h, valid, counts, cache.conv[i], cache.ssm[i])
        if output_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), output_index]  # (B, dim)
        h = self.backbone.norm_f(h)
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        return logits[..., : self.config.vocab_size].float()
