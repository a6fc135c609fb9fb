"""Model configuration: parsed once from `params.json` (native) or `config.json` (Hugging Face).

The config is data: frozen, checked in `__post_init__`, passed down to every layer, so a
model's shape reads off its config. Optional parts (`moe`, `lora`, ...) are `None` when absent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)

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
        return params


def _parse_moe(data: Any, source: Path) -> MoeConfig | None:
    """`params.json`'s `moe` part: absent or null for dense models."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ModelLoadError(source, f"moe must be an object, got {data!r}")
    try:
        return MoeConfig(num_experts=_require(data, "num_experts", source),
                         num_experts_per_tok=_require(data, "num_experts_per_tok", source))
    except ValueError as e:
        raise ModelLoadError(source, str(e)) from None


def _expand_windows(value: Any, n_layers: int, source: Path) -> tuple[int | None, ...]:
    """`sliding_window` is absent, an int, or a list that repeats as a pattern over the layers."""
    if value is None:
        return (None,) * n_layers
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n_layers
    if isinstance(value, list) and value and n_layers % len(value) == 0:
        return tuple(value) * (n_layers // len(value))
    raise ModelLoadError(
        source, f"sliding_window must be an int, null or a list dividing n_layers, got {value!r}"
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object at the top level")
    return data


def _require(data: dict[str, Any], key: str, source: Path) -> Any:
    if key not in data:
        raise ModelLoadError(source, f"missing required field {key!r}")
    return data[key]


def _build(source: Path, **kwargs: Any) -> TransformerConfig:
    try:
        return TransformerConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(source, str(e)) from None


def from_params(path: Path) -> TransformerConfig:
    """Parse a native Mistral `params.json`."""
    data = read_json(path)
    dim = _require(data, "dim", path)
    n_heads = _require(data, "n_heads", path)
    n_layers = _require(data, "n_layers", path)
    head_dim = data.get("head_dim") or (dim // n_heads if isinstance(dim, int) and
                                        isinstance(n_heads, int) and n_heads else 0)
    if "rope_theta" not in data:
        log.info("%s has no rope_theta: using %g", path,
                 MOE_ROPE_THETA if data.get("moe") else LEGACY_ROPE_THETA)
    known = {"dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
             "vocab_size", "rope_theta", "sliding_window", "tied_embeddings",
             "max_position_embeddings", "max_seq_len", "moe"}
    return _build(
        path,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=data.get("n_kv_heads", n_heads),
        head_dim=head_dim,
        hidden_dim=_require(data, "hidden_dim", path),
        vocab_size=_require(data, "vocab_size", path),
        norm_eps=float(data.get("norm_eps", 1e-5)),
        rope_theta=float(data.get("rope_theta", MOE_ROPE_THETA if data.get("moe")
                                  else LEGACY_ROPE_THETA)),
        sliding_windows=_expand_windows(data.get("sliding_window"), n_layers, path)
        if isinstance(n_layers, int) else (),
        tied_embeddings=bool(data.get("tied_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings") or data.get("max_seq_len"),
        moe=_parse_moe(data.get("moe"), path),
        extras={k: v for k, v in data.items() if k not in known},
    )


HF_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM")


def from_hf_config(path: Path) -> TransformerConfig:
    """Parse a Hugging Face `config.json` (MistralForCausalLM, MixtralForCausalLM).

    Mixtral's `num_experts_per_tok` defaults to 2 when absent, as in transformers.
    """
    data = read_json(path)
    archs = data.get("architectures") or []
    if archs and not set(archs) & set(HF_ARCHITECTURES):
        raise ModelLoadError(
            path, f"unsupported architecture {archs}; supported: {', '.join(HF_ARCHITECTURES)}"
        )
    dim = _require(data, "hidden_size", path)
    n_heads = _require(data, "num_attention_heads", path)
    n_layers = _require(data, "num_hidden_layers", path)
    rope = data.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", data.get("rope_theta", LEGACY_ROPE_THETA))
    if rope.get("rope_type", "default") != "default" or data.get("rope_scaling"):
        raise ModelLoadError(path, "only the default rotary embedding is supported")
    head_dim = data.get("head_dim") or (dim // n_heads if isinstance(dim, int) and
                                        isinstance(n_heads, int) and n_heads else 0)
    window = data.get("sliding_window") if data.get("use_sliding_window", True) else None
    return _build(
        path,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=data.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        hidden_dim=_require(data, "intermediate_size", path),
        vocab_size=_require(data, "vocab_size", path),
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        sliding_windows=_expand_windows(window, n_layers, path) if isinstance(n_layers, int)
        else (),
        tied_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings"),
        moe=_parse_moe({"num_experts": data["num_local_experts"],
                        "num_experts_per_tok": data.get("num_experts_per_tok", 2)}, path)
        if "num_local_experts" in data else None,
    )
