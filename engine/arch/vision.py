"""Pixtral's vision side: the encoder, the patch merger and the vision-language adapter.

An image (already resized and normalised by mistral-common's `ImageEncoder`, so its sides are
multiples of `patch_size * spatial_merge_size`) becomes one feature per `[IMG]` token:

    pixels (C, H, W) --patch_conv--> (h, w) patches --ln_pre--> blocks (2-D rotary, SiLU-gated
    feed-forward; each image's patches attend only to that image's) --[pre_norm]-->
    [patch merger: each merge x merge block of patches -> one] --adapter (GELU)--> (h*w, dim)

Features come out in row-major order over the (merged) patch grid, the order in which
mistral-common emits the image's `[IMG]` tokens (skipping its `[IMG_BREAK]`/`[IMG_END]`).

Several images go through the encoder as one packed sequence with block-diagonal attention
(`attention.block_diagonal_attention`): the result equals encoding each image alone. The
reference implementation (mistral-inference) builds that mask and then drops it before the
attention call, so its patches attend across images; Hugging Face's applies it.

Module names are the native checkpoint keys below the `vision.` prefix (`encoder` holds
`vision_encoder.*`, `adapter` `vision_language_adapter.*`, `pre_norm` `pre_mm_projector_norm`,
`merger` `patch_merger`); the renaming is `checkpoints/pixtral.py`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import block_diagonal_attention
from .config import VisionConfig
from .layers import FeedForward, RMSNorm, apply_rotary, cos_sin_pairs, rotary_inv_freq


def rotary_cos_sin_2d(grids: Sequence[tuple[int, int]], head_dim: int, theta: float,
                      dtype: torch.dtype, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D rotation of the patches of images with `grids` (rows, columns) of patches, packed
    row-major one image after the other: two `(N, 1, head_dim)` factors for `apply_rotary`.

    Of the `head_dim / 2` frequencies of a 1-D rotary embedding, the even ones turn with the
    patch's row and the odd ones with its column: the first `head_dim / 4` pairs rotate by
    row * f[0::2], the last `head_dim / 4` by column * f[1::2] (native interleaved pairs).
    """
    inv_freq = rotary_inv_freq(head_dim, theta, device)
    rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids])
    cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids])
    angles = torch.cat((rows[:, None].float() * inv_freq[0::2],
                        cols[:, None].float() * inv_freq[1::2]), dim=-1)  # (N, hd/2)
    cos, sin = cos_sin_pairs(angles, dtype)
    return cos[:, None, :], sin[:, None, :]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seqlens: Sequence[int]) -> torch.Tensor:
        n = x.shape[0]  # (N, dim): every image's patches, packed
        q = apply_rotary(self.wq(x).view(n, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(n, self.n_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(n, self.n_heads, self.head_dim)
        out = block_diagonal_attention(q, k, v, seqlens)  # (N, H, hd)
        return self.wo(out.reshape(n, self.n_heads * self.head_dim))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.attention = VisionAttention(config)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.activation)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seqlens: Sequence[int]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, seqlens)
        return h + self.feed_forward(self.ffn_norm(h))


class VisionLayers(nn.Module):
    """Holds the blocks as `layers.N` (the checkpoints' `vision_encoder.transformer.layers.N`)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.n_layers))


class VisionEncoder(nn.Module):
    """Pixels -> one feature of width `config.dim` per patch."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_conv = nn.Conv2d(config.num_channels, config.dim, kernel_size=config.patch_size,
                                    stride=config.patch_size, bias=False)
        self.ln_pre = RMSNorm(config.dim, config.norm_eps)
        self.transformer = VisionLayers(config)

    def forward(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """`images`: each (C, H, W), sides multiples of the patch size. Returns the packed
        features (N, dim), row-major per image, and each image's (rows, columns) of patches."""
        weight = self.patch_conv.weight
        patches = [self.patch_conv(image.to(weight.dtype)[None])[0] for image in images]
        grids = [(p.shape[1], p.shape[2]) for p in patches]  # (dim, h, w) each
        x = torch.cat([p.flatten(1).T for p in patches])  # (N, dim)
        x = self.ln_pre(x)
        cos, sin = rotary_cos_sin_2d(grids, self.config.head_dim, self.config.rope_theta,
                                     x.dtype, x.device)
        seqlens = [h * w for h, w in grids]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, seqlens)
        return x, grids


class PatchMerger(nn.Module):
    """Folds each `m x m` block of an image's patch grid into one feature (Mistral Small 3.1).

    The block's features are concatenated channel-major (channel, row in block, column in
    block), the order of `F.unfold` that the checkpoints' `merging_layer` was trained on.
    """

    def __init__(self, dim: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        m = self.merge
        d = x.shape[-1]
        blocks = []
        for image, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
            grid = image.view(h // m, m, w // m, m, d)  # (block row, row in block, block col, ..)
            blocks.append(grid.permute(0, 2, 4, 1, 3).reshape(-1, d * m * m))  # (hw/m², d m²)
        return self.merging_layer(torch.cat(blocks))


class VisionLanguageAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool) -> None:
        super().__init__()
        self.w_in = nn.Linear(in_dim, out_dim, bias=bias)
        self.w_out = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class VisionTower(nn.Module):
    """Encoder, optional norm and patch merger, adapter: images -> decoder embeddings."""

    def __init__(self, config: VisionConfig, out_dim: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = VisionEncoder(config)
        self.pre_norm = RMSNorm(config.dim, config.pre_norm_eps) if config.pre_norm else None
        self.merger = (PatchMerger(config.dim, config.spatial_merge_size)
                       if config.spatial_merge_size > 1 else None)
        self.adapter = VisionLanguageAdapter(config.dim, out_dim, config.adapter_bias)

    def tokens_per_image(self, height: int, width: int) -> int:
        """`[IMG]` tokens of an image of `height x width` pixels (as preprocessed)."""
        side = self.config.patch_size * self.config.spatial_merge_size
        return (height // side) * (width // side)

    def check_pixels(self, image: torch.Tensor) -> None:
        """ValueError unless `image` is (channels, H, W) with sides that the patch size (times
        the merge size) divides."""
        side = self.config.patch_size * self.config.spatial_merge_size
        if (image.ndim != 3 or image.shape[0] != self.config.num_channels
                or image.shape[1] % side or image.shape[2] % side or image.shape[1] == 0
                or image.shape[2] == 0):
            raise ValueError(f"pixels of shape {tuple(image.shape)}: expected "
                             f"({self.config.num_channels}, H, W) with H and W positive "
                             f"multiples of {side}")

    def forward(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One `(tokens_i, out_dim)` tensor per image, in the order of its `[IMG]` tokens."""
        if not images:
            return []
        for image in images:
            self.check_pixels(image)
        x, grids = self.encoder(images)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        if self.merger is not None:
            x = self.merger(x, grids)
            m = self.config.spatial_merge_size
            grids = [(h // m, w // m) for h, w in grids]
        x = self.adapter(x)
        return list(x.split([h * w for h, w in grids]))
