"""The decoder's configuration: data, frozen, checked in `__post_init__`, passed down to every
layer, so a model's shape reads off its config. Optional parts (`moe`, ...) are `None` when
absent. Reading it from `params.json` or `config.json` is `checkpoints/dense.py`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Checkpoints whose params.json omits `rope_theta` (Mistral 7B v0.1/v0.2 era) were trained with
# the original RoPE base; their Hugging Face configs say 10000. Current mistral-inference assumes
# 1e6 when the field is missing, which silently degrades those models.
LEGACY_ROPE_THETA = 10_000.0
# Mixtral came later: its params.json has no `rope_theta` either, but it was trained with 1e6
# (its Hugging Face config says 1000000.0). No MoE checkpoint used the legacy base.
MOE_ROPE_THETA = 1_000_000.0


@dataclass(frozen=True)
class MoeConfig:
    """Mixture of experts (Mixtral): each token goes to `num_experts_per_tok` of `num_experts`
    feed-forward experts, chosen by a linear gate."""

    num_experts: int
    num_experts_per_tok: int

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"moe.{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"moe.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                             f"moe.num_experts ({self.num_experts})")


def _check_positive(owner: str, obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """Pixtral's vision encoder and the adapter that maps its features into the decoder.

    The encoder (`dim`, `n_layers`, ...) cuts an image into `patch_size` squares, one feature
    each; with `spatial_merge_size` 2 (Mistral Small 3.1) a patch merger then folds each 2x2
    block of patches into one, after an RMSNorm (`pre_norm`). The adapter (two linear layers,
    GELU) maps each feature to the decoder's width; it replaces the embedding of one `[IMG]`
    token (`image_token_id`) of the prompt.
    """

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    patch_size: int
    image_size: int  # the longest side, in pixels, an image is resized to at most
    num_channels: int = 3
    rope_theta: float = 10_000.0  # of the 2-D (row, column) rotary embedding
    norm_eps: float = 1e-5  # the encoder's RMSNorms (both references fix it at 1e-5)
    image_token_id: int = 10
    adapter_bias: bool = True
    spatial_merge_size: int = 1  # > 1: a patch merger folds merge x merge patches into one
    pre_norm: bool = False  # an RMSNorm before the merger and adapter
    pre_norm_eps: float = 1e-5
    activation: str = "silu"  # of the gated feed-forward (Mistral's checkpoints: SiLU)

    def __post_init__(self) -> None:
        _check_positive("vision_encoder.", self, (
            "dim", "n_layers", "n_heads", "hidden_dim", "patch_size", "image_size",
            "num_channels", "spatial_merge_size"))
        if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ValueError(f"vision_encoder.image_token_id must be a token id, got "
                             f"{self.image_token_id!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"vision_encoder.hidden_size ({self.dim}) must be a multiple of "
                             f"num_attention_heads ({self.n_heads})")
        if self.head_dim % 4:
            raise ValueError(f"the vision head size ({self.head_dim}) must be a multiple of 4 "
                             "for the 2-D rotary embedding")
        if self.norm_eps <= 0 or self.pre_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("vision norm eps and rope_theta must be positive")
        if self.activation not in ("silu", "gelu"):
            raise ValueError(f"vision activation {self.activation!r} is not supported (silu, "
                             "gelu)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_params(self) -> dict[str, Any]:
        """The `vision_encoder` block of a native `params.json`."""
        params: dict[str, Any] = {
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.hidden_dim,
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "max_image_size": self.image_size,
            "rope_theta": self.rope_theta,
            "image_token_id": self.image_token_id,
            "adapter_bias": self.adapter_bias,
        }
        if self.spatial_merge_size > 1:
            params["mm_projector_id"] = "patch_merge"
            params["spatial_merge_size"] = self.spatial_merge_size
        if self.pre_norm:
            params["add_pre_mm_projector_layer_norm"] = True
        return params


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a decoder: dense (Mistral 7B, Codestral 22B, NeMo, Ministral) or, with `moe`
    set, a mixture of experts (Mixtral)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = LEGACY_ROPE_THETA
    # One entry per layer: the attention window of that layer (None = full attention).
    sliding_windows: tuple[int | None, ...] = ()
    tied_embeddings: bool = False
    max_position_embeddings: int | None = None
    moe: MoeConfig | None = None  # set: every layer's feed-forward is a mixture of experts
    vision: VisionConfig | None = None  # set: images enter through a vision encoder (Pixtral)
    extras: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps and rope_theta must be positive")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.n_layers)
        if len(self.sliding_windows) != self.n_layers:
            raise ValueError(
                f"{len(self.sliding_windows)} sliding windows for {self.n_layers} layers"
            )
        for w in self.sliding_windows:
            if w is not None and (not isinstance(w, int) or w <= 0):
                raise ValueError(f"sliding_window entries must be positive integers, got {w!r}")
        if self.moe is not None and not isinstance(self.moe, MoeConfig):
            raise ValueError(f"moe must be a MoeConfig or None, got {self.moe!r}")
        if self.vision is not None and not isinstance(self.vision, VisionConfig):
            raise ValueError(f"vision must be a VisionConfig or None, got {self.vision!r}")

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_params(self) -> dict[str, Any]:
        """The native `params.json` form of this config."""
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
        }
        windows = set(self.sliding_windows)
        if windows != {None}:
            params["sliding_window"] = (
                self.sliding_windows[0] if len(windows) == 1 else list(self.sliding_windows)
            )
        if self.tied_embeddings:
            params["tied_embeddings"] = True
        if self.moe is not None:
            params["moe"] = {"num_experts": self.moe.num_experts,
                             "num_experts_per_tok": self.moe.num_experts_per_tok}
        if self.vision is not None:
            params["vision_encoder"] = self.vision.to_params()
        return params


@dataclass(frozen=True)
class MambaConfig:
    """Shape of a Mamba2 language model; the defaults are the reference Mamba2 layer's."""

    dim: int
    n_layers: int
    vocab_size: int  # the tokenizer's vocabulary: logits have this many columns
    n_groups: int = 1
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    chunk_size: int = 256
    norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 1  # embedding rows = vocab_size rounded up to this multiple
    tie_embeddings: bool = False
    residual_in_fp32: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)
    max_position_embeddings: int | None = None  # a recurrent model has no context limit
    extras: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "vocab_size", "n_groups", "d_state", "d_conv", "expand",
                     "head_dim", "chunk_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_inner % self.head_dim:
            raise ValueError(f"expand * dim ({self.d_inner}) must be a multiple of head_dim "
                             f"({self.head_dim})")
        if self.n_heads % self.n_groups:
            raise ValueError(f"the number of heads ({self.n_heads}) must be a multiple of "
                             f"n_groups ({self.n_groups})")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low < high, got "
                             f"{self.dt_limit}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal convolution: x, B and C."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m
