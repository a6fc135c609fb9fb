"""Dense transformer checkpoints (Mistral 7B, Codestral 22B, NeMo, Ministral) and their MoE
variant (Mixtral): config parsing, weight names and rotary layouts of both layouts.

Native Mistral folders (`params.json` + `consolidated*.safetensors`) load as they are: our module
names are the native keys. Hugging Face folders (`config.json` + `model*.safetensors`) are
renamed here, and their q/k rows permuted from HF's rotate-half layout to the native interleaved
one. The export helpers (`state_dict_to_hf`, `hf_config_dict`) write the Hugging Face copy that
tests compare against transformers.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn

from ..arch.config import LEGACY_ROPE_THETA, MOE_ROPE_THETA, MoeConfig, TransformerConfig
from ..arch.transformer import Transformer
from ..errors import ModelLoadError
from .family import BlockCount
from .files import config_float, read_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Configs


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
        norm_eps=config_float(data, "norm_eps", 1e-5, path),
        rope_theta=config_float(data, "rope_theta", MOE_ROPE_THETA if data.get("moe")
                                else LEGACY_ROPE_THETA, path),
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
    return from_hf_dict(data, path)


def from_hf_dict(data: dict[str, Any], path: Path) -> TransformerConfig:
    """A decoder's config from a `MistralConfig`/`MixtralConfig` dict (`config.json`, or the
    `text_config` of a vision model's)."""
    dim = _require(data, "hidden_size", path)
    n_heads = _require(data, "num_attention_heads", path)
    n_layers = _require(data, "num_hidden_layers", path)
    rope = data.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelLoadError(path, f"rope_parameters must be an object, got {rope!r}")
    rope_theta = config_float(rope, "rope_theta",
                              config_float(data, "rope_theta", LEGACY_ROPE_THETA, path), path)
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
        norm_eps=config_float(data, "rms_norm_eps", 1e-6, path),
        rope_theta=rope_theta,
        sliding_windows=_expand_windows(window, n_layers, path) if isinstance(n_layers, int)
        else (),
        tied_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings"),
        moe=_parse_moe({"num_experts": data["num_local_experts"],
                        "num_experts_per_tok": data.get("num_experts_per_tok", 2)}, path)
        if "num_local_experts" in data else None,
    )

# ---------------------------------------------------------------------------------------------
# Hugging Face <-> native names and rotary layout


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_NATIVE_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TO_NATIVE_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_NATIVE_TO_HF_LAYER = {v: k for k, v in _HF_TO_NATIVE_LAYER.items()}
_NATIVE_TO_HF_TOP = {v: k for k, v in _HF_TO_NATIVE_TOP.items()}
# Mixtral (MoE): the same names under another prefix, in the layout Mixtral's Hugging Face
# repositories use (one tensor per expert, as transformers' legacy MixtralForCausalLM saved).
_HF_MOE = re.compile(r"^block_sparse_moe\.(gate\.weight|experts\.\d+\.w[123]\.weight)$")
_NATIVE_MOE = re.compile(r"^feed_forward\.(gate\.weight|experts\.\d+\.w[123]\.weight)$")


def hf_to_native_name(name: str) -> str | None:
    if name in _HF_TO_NATIVE_TOP:
        return _HF_TO_NATIVE_TOP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_TO_NATIVE_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_NATIVE_LAYER[m.group(2)]}"
    moe = _HF_MOE.match(m.group(2)) if m else None
    if m and moe:
        return f"layers.{m.group(1)}.feed_forward.{moe.group(1)}"
    return None


def native_to_hf_name(name: str) -> str:
    if name in _NATIVE_TO_HF_TOP:
        return _NATIVE_TO_HF_TOP[name]
    layer, rest = name.split(".", 2)[1:]
    moe = _NATIVE_MOE.match(rest)
    if moe:
        return f"model.layers.{layer}.block_sparse_moe.{moe.group(1)}"
    return f"model.layers.{layer}.{_NATIVE_TO_HF_LAYER[rest]}"


def hf_to_native_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """q/k rows from HF's rotate-half order to the native adjacent-pairs order."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def native_to_hf_rotary(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _rotary_heads(native_name: str, config: TransformerConfig) -> int | None:
    if native_name.endswith("attention.wq.weight"):
        return config.n_heads
    if native_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def state_dict_to_hf(state: dict[str, torch.Tensor],
                     config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A native state dict in Hugging Face names and rotary layout (for export and tests)."""
    out = {}
    for name, w in state.items():
        heads = _rotary_heads(name, config)
        out[native_to_hf_name(name)] = (
            native_to_hf_rotary(w, heads, config.head_dim) if heads else w
        ).contiguous()
    return out


def hf_config_dict(config: TransformerConfig) -> dict[str, object]:
    """The `config.json` of a Hugging Face copy of a model with this config."""
    windows = set(config.sliding_windows)
    if len(windows) > 1:
        raise ValueError("Hugging Face's Mistral config has one sliding window for all layers")
    moe: dict[str, object] = {}
    if config.moe is not None:
        moe = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
               "num_local_experts": config.moe.num_experts,
               "num_experts_per_tok": config.moe.num_experts_per_tok,
               "router_jitter_noise": 0.0, "output_router_logits": False}
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings or 32768,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "sliding_window": windows.pop(),
        "tie_word_embeddings": config.tied_embeddings,
        "vocab_size": config.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **moe,
    }


# ---------------------------------------------------------------------------------------------
# The family


_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"^layers\.\d+\.feed_forward\.experts\.(\d+)\.")


class DenseFamily:
    """Dense and MoE transformers: `params.json` without a `model_type` (or "transformer"),
    `config.json` of `MistralForCausalLM` / `MixtralForCausalLM`."""

    name = "Mistral dense transformer"

    def claims(self, data: dict[str, Any], hf: bool) -> bool:
        if hf:
            archs = data.get("architectures") or []
            return not archs or bool(set(archs) & set(HF_ARCHITECTURES))
        return data.get("model_type", "transformer") == "transformer" and \
            not data.get("vision_encoder")

    def block_counts(self, data: dict[str, Any], hf: bool) -> list[BlockCount]:
        if hf:
            counts = [BlockCount("num_hidden_layers", data.get("num_hidden_layers"), _LAYER,
                                 "layers")]
            if "num_local_experts" in data:
                counts.append(BlockCount("num_local_experts", data["num_local_experts"],
                                         _EXPERT, "experts"))
            return counts
        counts = [BlockCount("n_layers", data.get("n_layers"), _LAYER, "layers")]
        moe = data.get("moe")
        if isinstance(moe, dict):
            counts.append(BlockCount("moe.num_experts", moe.get("num_experts"), _EXPERT,
                                     "experts"))
        return counts

    def parse_config(self, path: Path, hf: bool) -> TransformerConfig:
        return from_hf_config(path) if hf else from_params(path)

    def build(self, config: TransformerConfig) -> nn.Module:
        return Transformer(config)

    def rename(self, stored: str, hf: bool) -> str | None:
        return hf_to_native_name(stored) if hf else stored

    def stored_name(self, ours: str, hf: bool) -> str:
        return native_to_hf_name(ours) if hf else ours

    def tied(self, config: TransformerConfig) -> tuple[str, str] | None:
        return ("output.weight", "tok_embeddings.weight") if config.tied_embeddings else None

    def convert(self, ours: str, tensor: torch.Tensor, config: TransformerConfig,
                hf: bool) -> torch.Tensor:
        heads = _rotary_heads(ours, config) if hf else None
        return hf_to_native_rotary(tensor, heads, config.head_dim) if heads else tensor

    def keeps_float32(self, ours: str) -> bool:
        return False

    def check_tokenizer(self, config: TransformerConfig, tokenizer: MistralTokenizer,
                        path: Path) -> None:
        pass  # any Mistral tokenizer serves a text model


FAMILY = DenseFamily()
