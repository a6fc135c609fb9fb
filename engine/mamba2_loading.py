"""Mamba2 checkpoints: weight names of both layouts, loading, and tiny random copies.

`loading.load` hands over here for a native folder whose `params.json` says
`"model_type": "mamba"` and for a Hugging Face folder of `Mamba2ForCausalLM`. Our module names
are the native keys without their `model.` prefix; Hugging Face's differ only in
`backbone.embeddings` (plural). No tensor needs permuting.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ModelLoadError
from .loading import _hf_files, _index_tensors, _native_files, check_tensors
from .mamba2 import NATIVE_EXTRA_FIELDS, REFERENCE_VALUES, Mamba2, MambaConfig
from .model import Model
from .tokenizer import find_tokenizer_file, load_tokenizer

log = logging.getLogger(__name__)

HF_ARCHITECTURE = "Mamba2ForCausalLM"
_NATIVE_PREFIX = "model."
_HF_EMBEDDING = "backbone.embeddings.weight"
_EMBEDDING = "backbone.embedding.weight"
# Per-head parameters stay float32 whatever the model's dtype: they are tiny, and A and dt
# set the decay of a state that accumulates over the whole sequence.
_FLOAT32_SUFFIXES = (".A_log", ".D", ".dt_bias")


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


def load_mamba(folder: Path, *, hf: bool, device: str | torch.device,
               dtype: torch.dtype | None) -> Model:
    """Load a Mamba2 folder (native or Hugging Face layout); `dtype=None` keeps the stored one."""
    if hf:
        config = MambaConfig.from_hf_config(folder / "config.json")
        files = _hf_files(folder)
    else:
        config = MambaConfig.from_params(folder / "params.json")
        files = _native_files(folder)
    rename: Callable[[str], str | None] = hf_to_ours if hf else native_to_ours
    stored_name: Callable[[str], str] = ours_to_hf if hf else ours_to_native
    tokenizer = load_tokenizer(find_tokenizer_file(folder))

    index = _index_tensors(files, rename, kind="Mamba2")
    with torch.device("meta"):
        module = Mamba2(config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if config.tie_embeddings:
        index.pop("lm_head.weight", None)
        del expected["lm_head.weight"]
    check_tensors(index, expected, files[0], stored_name=stored_name,
                  unexpected_hint=" (not a Mamba2 weight)")

    target = dtype or index[_EMBEDDING][3]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name, (src, stored, _, _) in index.items():
                    if src == f:
                        want = torch.float32 if name.endswith(_FLOAT32_SUFFIXES) else target
                        state[name] = handle.get_tensor(stored).to(device=device, dtype=want)
        except SafetensorError as e:
            raise ModelLoadError(f, f"cannot read tensors ({e})") from None
    if config.tie_embeddings:
        state["lm_head.weight"] = state[_EMBEDDING]
    module.load_state_dict(state, assign=True, strict=True)
    module.eval().requires_grad_(False)
    log.info("loaded %s (Mamba2, %s layout, %s, %s)", folder, "hf" if hf else "native", target,
             device)
    return Model(module, config, tokenizer, folder)


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
