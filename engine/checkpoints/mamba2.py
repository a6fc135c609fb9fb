"""Mamba2 checkpoints (Codestral Mamba): config parsing, weight names of both layouts, and tiny
random copies.

A native folder whose `params.json` says `"model_type": "mamba"`, or a Hugging Face folder of
`Mamba2ForCausalLM`. Our module names are the native keys without their `model.` prefix; Hugging
Face's differ only in `backbone.embeddings` (plural). No tensor needs permuting.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import save_file
from torch import nn

from ..arch.config import MambaConfig
from ..arch.mamba2 import Mamba2
from ..errors import ModelLoadError
from .family import BlockCount
from .files import config_float, read_json

HF_ARCHITECTURE = "Mamba2ForCausalLM"
_NATIVE_PREFIX = "model."
_HF_EMBEDDING = "backbone.embeddings.weight"
_EMBEDDING = "backbone.embedding.weight"
# Per-head parameters stay float32 whatever the model's dtype: they are tiny, and A and dt
# set the decay of a state that accumulates over the whole sequence.
_FLOAT32_SUFFIXES = (".A_log", ".D", ".dt_bias")
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


def from_params(path: Path) -> MambaConfig:
    """Parse a native `params.json` (`"model_type": "mamba"`).

    Mistral's files list only the fields below; the layer's other hyper-parameters are the
    reference Mamba2's. A tiny test model may set them with mamba_ssm's names (`d_state`,
    `d_conv`, `expand`, `headdim`, `chunk_size`) and `norm_eps`.
    """
    data = read_json(path)
    for key in ("dim", "n_layers", "vocab_size", "n_groups"):
        if key not in data:
            raise ModelLoadError(path, f"missing required field {key!r}")
    if data.get("rms_norm", True) is not True:
        raise ModelLoadError(path, "rms_norm: false (LayerNorm) is not supported; Mamba2 "
                             "checkpoints use RMSNorm")
    known = {"model_type", "dim", "n_layers", "vocab_size", "n_groups", "rms_norm",
             "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
             "tie_embeddings", *NATIVE_EXTRA_FIELDS.values()}
    extra = {name: data[native] for name, native in NATIVE_EXTRA_FIELDS.items()
             if native in data}
    return _build(
        path, dim=data["dim"], n_layers=data["n_layers"], vocab_size=data["vocab_size"],
        n_groups=data["n_groups"],
        pad_vocab_size_multiple=data.get("pad_vocab_size_multiple", 1),
        tie_embeddings=bool(data.get("tie_embeddings", False)),
        residual_in_fp32=bool(data.get("residual_in_fp32", True)),
        extras={k: v for k, v in data.items() if k not in known}, **extra)


def from_hf_config(path: Path) -> MambaConfig:
    """Parse a Hugging Face `config.json` of `Mamba2ForCausalLM` (missing fields take
    transformers' `Mamba2Config` defaults, as transformers would)."""
    data = read_json(path)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in data:
            raise ModelLoadError(path, f"missing required field {key!r}")
    unsupported = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu"}
    for key, want in unsupported.items():
        if data.get(key, want) != want:
            raise ModelLoadError(path, f"{key}={data[key]!r} is not supported (only "
                                 f"{want!r}, as in Codestral Mamba)")
    limit = data.get("time_step_limit", [0.0, math.inf])
    if not (isinstance(limit, list) and len(limit) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)):
        raise ModelLoadError(path, f"time_step_limit must be [low, high], got {limit!r}")
    config = _build(
        path, dim=data["hidden_size"], n_layers=data["num_hidden_layers"],
        vocab_size=data["vocab_size"], n_groups=data.get("n_groups", 8),
        d_state=data.get("state_size", 128), d_conv=data.get("conv_kernel", 4),
        expand=data.get("expand", 2), head_dim=data.get("head_dim", 64),
        chunk_size=data.get("chunk_size", 256),
        norm_eps=config_float(data, "layer_norm_epsilon", 1e-5, path),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        residual_in_fp32=bool(data.get("residual_in_fp32", True)),
        dt_limit=(float(limit[0]), float(limit[1])))
    heads = data.get("num_heads", config.n_heads)
    if heads != config.n_heads:
        raise ModelLoadError(path, f"num_heads ({heads}) must be expand * hidden_size / "
                             f"head_dim ({config.n_heads})")
    return config


# MambaConfig field -> its params.json name (mamba_ssm's), for the hyper-parameters that
# Mistral's params.json leaves at the reference value.
NATIVE_EXTRA_FIELDS = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand",
                       "head_dim": "headdim", "chunk_size": "chunk_size", "norm_eps": "norm_eps"}
REFERENCE_VALUES: dict[str, object] = {"d_state": 128, "d_conv": 4, "expand": 2,
                                       "head_dim": 64, "chunk_size": 256, "norm_eps": 1e-5}


def _build(source: Path, **kwargs: Any) -> MambaConfig:
    try:
        return MambaConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(source, str(e)) from None


def native_to_ours(name: str) -> str | None:
    return name[len(_NATIVE_PREFIX):] if name.startswith(_NATIVE_PREFIX) else None


def hf_to_ours(name: str) -> str | None:
    # transformers' own load hook also accepts the singular `backbone.embedding.weight`.
    return _EMBEDDING if name == _HF_EMBEDDING else name


def ours_to_native(name: str) -> str:
    return _NATIVE_PREFIX + name


def ours_to_hf(name: str) -> str:
    return _HF_EMBEDDING if name == _EMBEDDING else name


def is_mamba_hf_config(data: dict[str, object]) -> bool:
    return data.get("architectures") == [HF_ARCHITECTURE] or data.get("model_type") == "mamba2"


def mamba_params(config: MambaConfig) -> dict[str, Any]:
    """The native `params.json`; hyper-parameters at their reference value are left out, as
    in Mistral's own files."""
    params: dict[str, Any] = {
        "model_type": "mamba", "dim": config.dim, "n_layers": config.n_layers,
        "vocab_size": config.vocab_size, "n_groups": config.n_groups, "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }
    for name, native in NATIVE_EXTRA_FIELDS.items():
        value = getattr(config, name)
        if value != REFERENCE_VALUES[name]:
            params[native] = value
    return params


def mamba_hf_config(config: MambaConfig) -> dict[str, Any]:
    """The `config.json` of a Hugging Face copy (its vocabulary: the padded embedding rows)."""
    c = config
    return {
        "architectures": [HF_ARCHITECTURE], "model_type": "mamba2",
        "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "vocab_size": c.padded_vocab_size, "n_groups": c.n_groups,
        "state_size": c.d_state, "conv_kernel": c.d_conv, "expand": c.expand,
        "head_dim": c.head_dim, "num_heads": c.n_heads, "chunk_size": c.chunk_size,
        "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "residual_in_fp32": c.residual_in_fp32, "time_step_limit": list(c.dt_limit),
        "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }


class MambaFamily:
    """Mamba2: `params.json` with `"model_type": "mamba"`, `config.json` of
    `Mamba2ForCausalLM`."""

    name = "Mamba2"

    def claims(self, data: dict[str, Any], hf: bool) -> bool:
        return is_mamba_hf_config(data) if hf else data.get("model_type") == "mamba"

    def block_counts(self, data: dict[str, Any], hf: bool) -> list[BlockCount]:
        field = "num_hidden_layers" if hf else "n_layers"
        return [BlockCount(field, data.get(field), _LAYER, "layers")]

    def parse_config(self, path: Path, hf: bool) -> MambaConfig:
        return from_hf_config(path) if hf else from_params(path)

    def build(self, config: MambaConfig) -> nn.Module:
        return Mamba2(config)

    def rename(self, stored: str, hf: bool) -> str | None:
        return hf_to_ours(stored) if hf else native_to_ours(stored)

    def stored_name(self, ours: str, hf: bool) -> str:
        return ours_to_hf(ours) if hf else ours_to_native(ours)

    def tied(self, config: MambaConfig) -> tuple[str, str] | None:
        return ("lm_head.weight", _EMBEDDING) if config.tie_embeddings else None

    def convert(self, ours: str, tensor: torch.Tensor, config: MambaConfig,
                hf: bool) -> torch.Tensor:
        return tensor

    def keeps_float32(self, ours: str) -> bool:
        return ours.endswith(_FLOAT32_SUFFIXES)

    def check_tokenizer(self, config: MambaConfig, tokenizer: MistralTokenizer, path: Path) -> None:
        pass  # any Mistral tokenizer serves a text model


FAMILY = MambaFamily()


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoints


def random_mamba_state_dict(config: MambaConfig, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in the ranges trained models have: decay rates A in [1, 16], steps dt in
    [0.01, 0.5] (large enough that the state forgets within a chunk or two), D near 1, and a
    peaked output so that greedy choices are far from ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Mamba2(config).state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == _EMBEDDING:
            w = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            w = torch.randn(shape, generator=gen) * (4.0 / math.sqrt(shape[1]))
        elif name.endswith(".A_log"):
            w = torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
        elif name.endswith(".dt_bias"):
            dt = torch.empty(shape).uniform_(math.log(0.01), math.log(0.5), generator=gen).exp()
            w = dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus
        elif name.endswith(".D"):
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("conv1d.weight"):
            w = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        elif name.endswith("conv1d.bias"):
            w = 0.1 * torch.randn(shape, generator=gen)
        else:  # in_proj, out_proj: (out, in)
            w = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        state[name] = w.to(dtype)
    return state


def write_mamba_checkpoint(folder: Path, config: MambaConfig, state: dict[str, torch.Tensor],
                           *, layout: str = "native") -> None:
    """Write `state` (our names) as a native Mistral or a Hugging Face Mamba2 folder (the
    tokenizer is the caller's business)."""
    if layout == "native":
        (folder / "params.json").write_text(json.dumps(mamba_params(config), indent=2) + "\n")
        save_file({ours_to_native(k): v.contiguous() for k, v in state.items()},
                  str(folder / "consolidated.safetensors"))
    elif layout == "hf":
        (folder / "config.json").write_text(json.dumps(mamba_hf_config(config), indent=2) + "\n")
        save_file({ours_to_hf(k): v.contiguous() for k, v in state.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"layout must be 'native' or 'hf', got {layout!r}")
