"""The decoder (Mistral 7B, Codestral 22B, NeMo, Ministral; Mixtral when the config has `moe`:
then each block's feed-forward is a `MoeFeedForward`; Pixtral when it has `vision`: then a
`VisionTower` turns images into embeddings that replace those of the prompt's `[IMG]` tokens).
Module names follow the native checkpoint keys, so a native state dict loads as it is (the vision
tower's are renamed by its checkpoint family)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import AttentionPlan, KVCache
from .config import TransformerConfig
from .layers import Attention, FeedForward, Linear, RMSNorm, rotary_cos_sin
from .moe import MoeFeedForward
from .vision import VisionTower


@dataclass(frozen=True)
class EmbeddingOverride:
    """Embeddings that replace the token embeddings at some positions of one forward (image
    features at the `[IMG]` positions)."""

    mask: torch.Tensor  # (B, T) bool: the positions replaced
    values: torch.Tensor  # (mask.sum(), dim): their embeddings, in row-major order of `mask`


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.feed_forward: FeedForward | MoeFeedForward = (
            MoeFeedForward(config.dim, config.hidden_dim, config.moe) if config.moe
            else FeedForward(config.dim, config.hidden_dim))
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                plan: AttentionPlan) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, plan)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        self.vision = VisionTower(config.vision, config.dim) if config.vision else None

    def new_cache(self, batch_size: int, max_seq_len: int, *, rewind: int = 0,
                  device: torch.device | str, dtype: torch.dtype) -> KVCache:
        return KVCache(self.config, batch_size, max_seq_len, device=device, dtype=dtype,
                       rewind=rewind)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        output_index: torch.Tensor | None = None,
        embeddings: EmbeddingOverride | None = None,
    ) -> torch.Tensor:
        """Run `tokens: (B, T)` at `positions: (B, T)` (-1 = padding) through the model.

        Returns float32 logits `(B, T, V)`, or `(B, V)` for one token per row when
        `output_index: (B,)` names it (prefill needs only each row's last token: skipping the
        vocabulary projection of the others saves a large matmul). `embeddings` replaces the
        token embeddings where its mask is set.
        """
        plans = cache.plan(positions)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                  self.tok_embeddings.weight.dtype)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if embeddings is not None:
            h = h.masked_scatter(embeddings.mask[..., None], embeddings.values.to(h.dtype))
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, plans[cache.layer_group[layer_id]])
        if output_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), output_index]  # (B, dim)
        return self.output(self.norm(h)).float()
