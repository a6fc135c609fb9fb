"""Mixture-of-experts feed-forward (Mixtral): a linear gate routes each token to k experts.

Routing, as Mistral's reference does it: take the top-k of the raw gate logits and softmax over
those k only. Hugging Face's Mixtral softmaxes over all experts, takes the top-k of the
probabilities and renormalises them; softmax is monotonic and the renormalisation cancels the
other experts' share of the denominator, so both give the same experts and the same weights
(up to rounding). The gate runs in the model dtype; the routing weights are float32, as in
transformers (mistral-inference rounds them to the model dtype: identical in float32, within
one bfloat16 rounding otherwise).

Dispatch is grouped: tokens are sorted by expert and each expert that received any runs once,
on all of its tokens (one matmul per weight per active expert). An expert with no tokens costs
nothing; no Python loop runs over tokens. Each expert's output, weighted, is added into the
result in expert order, as transformers does, so float32 sums round the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoeConfig
from .layers import FeedForward, Linear


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits `(N, E)` -> float32 weights `(N, k)` and expert ids `(N, k)`.

    Expert ids come in decreasing order of their logit; each row's weights sum to 1.
    """
    top, experts = torch.topk(logits, k, dim=-1)
    return F.softmax(top.float(), dim=-1), experts


class MoeFeedForward(nn.Module):
    """`gate` and `experts.E.{w1,w2,w3}`: module names are the native checkpoint keys."""

    def __init__(self, dim: int, hidden_dim: int, moe: MoeConfig) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.k = moe.num_experts_per_tok
        self.gate = Linear(dim, moe.num_experts)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, dim)
        x = x.reshape(-1, shape[-1])  # (N, dim)
        weights, experts = route(self.gate(x), self.k)  # (N, k) each
        flat = experts.flatten()  # (N*k,): assignment i is token i // k
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            assignments = order[start:start + count]
            start += count
            tokens = assignments // self.k  # (n,): distinct, ascending
            y = self.experts[expert](x[tokens])  # (n, dim)
            out.index_add_(0, tokens, (y * flat_weights[assignments, None]).to(out.dtype))
        return out.view(shape)
