"""Tiny random-weight checkpoints with the real tokenizers mistral-common ships.

They let anyone (and every test) run the whole pipeline without downloading weights. Their
output is noise: the weights are random.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import mistral_common
import torch
from safetensors.torch import save_file

from ..arch.config import MambaConfig, MoeConfig, TransformerConfig, VisionConfig
from ..arch.transformer import Transformer
from . import pixtral
from .dense import hf_config_dict, state_dict_to_hf
from .mamba2 import random_mamba_state_dict, write_mamba_checkpoint

ARCHS = ("transformer", "mamba", "pixtral")

TOKENIZERS = {
    # name -> (file in mistral-common's data/, name in a checkpoint folder, vocabulary size)
    "v1": ("tokenizer.model.v1", "tokenizer.model.v1", 32000),
    "v2": ("mistral_instruct_tokenizer_240216.model.v2", "tokenizer.model.v2", 32768),
    "v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", 32768),
    "v7": ("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7", 32768),
    "tekken": ("tekken_240911.json", "tekken.json", 131072),
}

NOTICE = ("This checkpoint has random weights, made by `tramontane make-tiny` for trying the "
          "tools and for tests. Everything it generates is noise.\n")


def tokenizer_source(name: str) -> Path:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    return Path(mistral_common.__file__).parent / "data" / TOKENIZERS[name][0]


def tiny_config(tokenizer: str = "v3", *, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                n_kv_heads: int = 2, head_dim: int | None = None, hidden_dim: int = 128,
                sliding_window: int | list[int | None] | None = None,
                rope_theta: float = 1e6,
                moe: tuple[int, int] | None = None) -> TransformerConfig:
    """A small config; `moe=(num_experts, num_experts_per_tok)` makes it a mixture of experts."""
    vocab = TOKENIZERS[tokenizer][2] if tokenizer in TOKENIZERS else 32768
    if isinstance(sliding_window, list):
        windows: tuple[int | None, ...] = tuple(sliding_window) * (n_layers // len(sliding_window))
    else:
        windows = (sliding_window,) * n_layers
    return TransformerConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim or dim // n_heads, hidden_dim=hidden_dim, vocab_size=vocab,
        rope_theta=rope_theta, sliding_windows=windows,
        moe=MoeConfig(*moe) if moe is not None else None,
    )


def tiny_vision_config(*, patch_merge: bool = False, dim: int = 64, n_layers: int = 2,
                       n_heads: int = 4, hidden_dim: int = 128, patch_size: int | None = None,
                       image_size: int | None = None) -> VisionConfig:
    """A small vision tower cutting images as the real ones do: Pixtral 12B's (16-pixel patches,
    up to 1024 pixels, adapter biases) or, with `patch_merge`, Mistral Small 3.1's (14-pixel
    patches merged 2x2, up to 1540 pixels, a norm before the merger, no adapter biases)."""
    return VisionConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden_dim,
        patch_size=patch_size or (14 if patch_merge else 16),
        image_size=image_size or (1540 if patch_merge else 1024),
        spatial_merge_size=2 if patch_merge else 1, pre_norm=patch_merge,
        adapter_bias=not patch_merge)


def tiny_mamba_config(tokenizer: str = "v3", *, dim: int = 64, n_layers: int = 2,
                      n_groups: int = 2, d_state: int = 16, head_dim: int = 16, expand: int = 2,
                      d_conv: int = 4, chunk_size: int = 16, pad_vocab_size_multiple: int = 1,
                      tie_embeddings: bool = False) -> MambaConfig:
    """A small Mamba2: 8 heads in 2 groups, chunks of 16 tokens (so prompts span several)."""
    return MambaConfig(dim=dim, n_layers=n_layers, vocab_size=TOKENIZERS[tokenizer][2],
                       n_groups=n_groups, d_state=d_state, head_dim=head_dim, expand=expand,
                       d_conv=d_conv, chunk_size=chunk_size, tie_embeddings=tie_embeddings,
                       pad_vocab_size_multiple=pad_vocab_size_multiple)


def random_state_dict(config: TransformerConfig, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights scaled so activations keep unit size and the logits are peaked: greedy choices
    of a random model are then far from ties, which keeps parity tests meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            w = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # norms
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "tok_embeddings.weight":
            w = torch.randn(shape, generator=gen)
        elif name == "output.weight":
            w = torch.randn(shape, generator=gen) * (4.0 / math.sqrt(shape[1]))
        else:  # fan-in scaling (a convolution's fan-in is channels x kernel area)
            w = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        state[name] = w.to(dtype)
    return state


def write_checkpoint(folder: str | Path, config: TransformerConfig | MambaConfig,
                     state: dict[str, torch.Tensor], *, layout: str = "native",
                     tokenizer: str = "v3") -> Path:
    """Write `state` (our module names) as a native Mistral or Hugging Face folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = tokenizer_source(tokenizer)
    if isinstance(config, TransformerConfig) and config.vision is not None:
        _write_vision_checkpoint(folder, config, state, layout, src)
        (folder / "README.txt").write_text(NOTICE)
        return folder
    shutil.copyfile(src, folder / TOKENIZERS[tokenizer][1])
    if isinstance(config, MambaConfig):
        write_mamba_checkpoint(folder, config, state, layout=layout)
    elif layout == "native":
        (folder / "params.json").write_text(json.dumps(config.to_params(), indent=2) + "\n")
        save_file(state, str(folder / "consolidated.safetensors"))
    elif layout == "hf":
        (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
        save_file(state_dict_to_hf(state, config), str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        raise ValueError(f"layout must be 'native' or 'hf', got {layout!r}")
    (folder / "README.txt").write_text(NOTICE)
    return folder


def _write_vision_checkpoint(folder: Path, config: TransformerConfig,
                             state: dict[str, torch.Tensor], layout: str, tokenizer: Path) -> None:
    """A Pixtral folder: tekken.json with an `image` section that cuts images as the tower
    expects, and the weights in either layout."""
    vision = config.vision
    assert vision is not None
    if not tokenizer.name.startswith("tekken"):
        raise ValueError("a vision checkpoint needs the tekken tokenizer (its [IMG] tokens)")
    data = json.loads(tokenizer.read_text(encoding="utf-8"))
    data["image"] = {"image_patch_size": vision.patch_size, "max_image_size": vision.image_size,
                     "spatial_merge_size": vision.spatial_merge_size}
    (folder / "tekken.json").write_text(json.dumps(data), encoding="utf-8")
    if layout == "native":
        (folder / "params.json").write_text(json.dumps(config.to_params(), indent=2) + "\n")
        save_file(pixtral.state_dict_to_native(state), str(folder / "consolidated.safetensors"))
    elif layout == "hf":
        (folder / "config.json").write_text(
            json.dumps(pixtral.hf_config_dict(config), indent=2) + "\n")
        save_file(pixtral.state_dict_to_hf(state, config), str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        raise ValueError(f"layout must be 'native' or 'hf', got {layout!r}")


def make_tiny(folder: str | Path, *, layout: str = "native", tokenizer: str | None = None,
              seed: int = 0, dtype: torch.dtype = torch.float32, arch: str = "transformer",
              patch_merge: bool = False, **shape: object) -> Path:
    """Write a tiny random checkpoint; `shape` overrides `tiny_config`'s defaults (or
    `tiny_mamba_config`'s with `arch="mamba"`). `arch="pixtral"` adds a tiny vision tower
    (`tiny_vision_config`, with a patch merger if `patch_merge`) and takes the tekken tokenizer.
    The tokenizer defaults to v3 (tekken for pixtral)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if patch_merge and arch != "pixtral":
        raise ValueError("patch_merge is for arch='pixtral'")
    tokenizer = tokenizer or ("tekken" if arch == "pixtral" else "v3")
    if arch == "mamba":
        mamba = tiny_mamba_config(tokenizer, **shape)  # type: ignore[arg-type]
        return write_checkpoint(folder, mamba, random_mamba_state_dict(mamba, seed, dtype),
                                layout=layout, tokenizer=tokenizer)
    config = tiny_config(tokenizer, **shape)  # type: ignore[arg-type]
    if arch == "pixtral":
        config = dataclasses.replace(config, vision=tiny_vision_config(patch_merge=patch_merge))
    return write_checkpoint(folder, config, random_state_dict(config, seed, dtype),
                            layout=layout, tokenizer=tokenizer)
