"""Checkpoint folder -> the network, its config and its tokenizer.

One loader for every architecture: the folder's config file (`params.json`: native Mistral;
`config.json`: Hugging Face) is offered to each family of `FAMILIES` in turn, and the first that
claims it says how to parse the config, build the network and translate weight names and
layouts (`family.py`). Tensors are indexed from the safetensors headers and checked against the
network's shapes before any is read; the network is built on the meta device and its weights
assigned. Pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import ModelLoadError
from . import dense, mamba2, pixtral
from .family import Family
from .files import (
    check_not_pickle,
    check_tensors,
    hf_files,
    index_tensors,
    native_files,
    parse_dtype,
    read_json,
)
from .tokenizer import find_tokenizer_file, load_tokenizer

log = logging.getLogger(__name__)

# The architecture registry, in the order families are asked: the first that claims a folder's
# config loads it.
FAMILIES: tuple[Family, ...] = (mamba2.FAMILY, pixtral.FAMILY, dense.FAMILY)


@dataclass(frozen=True)
class Checkpoint:
    """What a folder holds, ready to run: the network (eval mode, no gradients), its config,
    the mistral-common tokenizer, and the family that read it."""

    module: nn.Module
    config: Any
    tokenizer: MistralTokenizer
    path: Path
    family: str


def _family(path: Path, data: dict[str, Any], hf: bool) -> Family:
    for family in FAMILIES:
        if family.claims(data, hf):
            return family
    if hf:
        raise ModelLoadError(path, f"unsupported architecture {data.get('architectures')}; "
                             f"supported: {', '.join(f.name for f in FAMILIES)}")
    raise ModelLoadError(path, f"model_type {data.get('model_type')!r} is not supported yet")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None) -> Checkpoint:
    """Load a native Mistral or Hugging Face checkpoint folder; `dtype=None` keeps the stored
    one (the first floating-point tensor's)."""
    folder = Path(path).expanduser()
    target_dtype = parse_dtype(dtype)
    if folder.is_file():
        check_not_pickle(folder)
        raise ModelLoadError(folder, "expected a model folder, got a file")
    if not folder.is_dir():
        raise ModelLoadError(folder, "model folder not found")
    if (folder / "params.json").exists():
        config_path, hf = folder / "params.json", False
    elif (folder / "config.json").exists():
        config_path, hf = folder / "config.json", True
    else:
        raise ModelLoadError(folder, "neither params.json (native Mistral) nor config.json "
                             "(Hugging Face) found")
    family = _family(config_path, read_json(config_path), hf)
    config = family.parse_config(config_path, hf)
    files = hf_files(folder) if hf else native_files(folder)
    tokenizer_file = find_tokenizer_file(folder)
    tokenizer = load_tokenizer(tokenizer_file)
    family.check_tokenizer(config, tokenizer, tokenizer_file)
    index = index_tensors(files, lambda stored: family.rename(stored, hf), kind=family.name)

    with torch.device("meta"):
        module = family.build(config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    tied = family.tied(config)
    if tied is not None:
        index.pop(tied[0], None)
        del expected[tied[0]]
    check_tensors(index, expected, files[0],
                  stored_name=lambda ours: family.stored_name(ours, hf),
                  unexpected_hint=f" (not a {family.name} weight)")

    if target_dtype is None:  # the stored dtype of the largest weight
        _, _, _, target_dtype = max(index.values(), key=lambda t: _numel(t[2]))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for ours, (src, stored, _, _) in index.items():
                    if src != f:
                        continue
                    w = family.convert(ours, handle.get_tensor(stored), config, hf)
                    want = torch.float32 if family.keeps_float32(ours) else target_dtype
                    state[ours] = w.to(device=device, dtype=want).contiguous()
        except SafetensorError as e:
            raise ModelLoadError(f, f"cannot read tensors ({e})") from None
    if tied is not None:
        state[tied[0]] = state[tied[1]]
    module.load_state_dict(state, assign=True, strict=True)
    module.eval().requires_grad_(False)
    log.info("loaded %s (%s, %s layout, %s, %s)", folder, family.name, "hf" if hf else "native",
             target_dtype, device)
    return Checkpoint(module, config, tokenizer, folder, family.name)
