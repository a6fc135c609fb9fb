"""Checkpoint folder -> the network, its config and its tokenizer.

One loader for every architecture: the folder's config file (`params.json`: native Mistral;
`config.json`: Hugging Face) is offered to each family of `FAMILIES` in turn, and the first that
claims it says how to parse the config, build the network and translate weight names and
layouts (`family.py`). Tensors are indexed from the safetensors headers first: the config's
counts of layers and experts are checked against the blocks stored before the config is parsed
(parsing and building cost memory in proportion to them), then the network is built on the
meta device (shapes only, whatever the widths), its shapes compared with the stored ones, and
only then are weights read and assigned. Pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors import SafetensorError, safe_open
from torch import nn

from ..arch import pages, quant
from ..errors import ModelLoadError
from . import dense, mamba2, pixtral, quantized
from .family import BlockCount, Family
from .files import (
    TensorIndex,
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
    quantize: quant.QuantMode | None = None


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


def check_block_counts(config_path: Path, counts: list[BlockCount], index: TensorIndex,
                       files: list[Path]) -> None:
    """Refuse a config that declares more layers (experts, ...) than the tensors hold, before
    anything of that size exists. Fewer is left to `check_tensors` (it names the first
    unexpected tensor)."""
    for count in counts:
        if isinstance(count.value, bool) or not isinstance(count.value, int):
            continue  # the family's parser says what is wrong with it
        held = {int(m.group(1)) for name in index if (m := count.pattern.match(name))}
        if count.value > len(held):
            where = files[0].name if len(files) == 1 else f"its {len(files)} safetensors files"
            raise ModelLoadError(
                config_path, f"{count.field} is {count.value}, but {where} hold"
                f"{'s' if len(files) == 1 else ''} the weights of {len(held)} {count.noun}")


def _weights_size(index: TensorIndex, dtype: torch.dtype | None) -> str:
    size = sum(_numel(shape) * (dtype or stored).itemsize for _, _, shape, stored in
               index.values())
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed: Python's MemoryError, torch's
    OutOfMemoryError (accelerators), or a CPU tensor torch could not allocate, which torch
    2.13 reports as a plain RuntimeError saying "can't allocate memory"."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None, *,
                    quantize: str | None = None,
                    quantized_dir: str | Path | None = None) -> Checkpoint:
    """Load a native Mistral or Hugging Face checkpoint folder; `dtype=None` keeps the stored
    one (the first floating-point tensor's).

    `quantize` ("int8", "int4"; transformers, dense or MoE) replaces the linear layers by
    weight-only quantized ones (`arch.quant`), quantized from the checkpoint's weights as they
    are read (one tensor at a time: the full-precision model never sits in memory), or read
    from the sidecar a previous load saved in `quantized_dir` (default:
    `quantized.default_cache_dir()`); `dtype` is then the activations' and the scales'.

    Every failure is a `ModelLoadError`, running out of memory included (it then says how much
    the weights need)."""
    folder = Path(path).expanduser()
    target_dtype = parse_dtype(dtype)
    if quantize is not None and quantize not in quant.QUANT_MODES:
        raise ModelLoadError(folder, f"quantize must be one of {', '.join(quant.QUANT_MODES)} "
                             f"or None, got {quantize!r}")
    index: TensorIndex = {}
    cache_dir = Path(quantized_dir).expanduser() if quantized_dir is not None \
        else quantized.default_cache_dir()
    try:
        return _load(folder, device, target_dtype, index,
                     cast("quant.QuantMode | None", quantize), cache_dir)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        weights = f" (its weights need {_weights_size(index, target_dtype)})" if index else ""
        raise ModelLoadError(folder, f"the model does not fit in memory{weights}") from None


def _load(folder: Path, device: str | torch.device, target_dtype: torch.dtype | None,
          index: TensorIndex, mode: quant.QuantMode | None, cache_dir: Path) -> Checkpoint:
    """`load_checkpoint`'s work; fills `index` as soon as the headers are read (for the
    out-of-memory message)."""
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
    data = read_json(config_path)
    family = _family(config_path, data, hf)
    files = hf_files(folder) if hf else native_files(folder)
    # Headers only: sizes are checked against what is stored before anything is built.
    index.update(index_tensors(files, lambda stored: family.rename(stored, hf),
                               kind=family.name))
    check_block_counts(config_path, family.block_counts(data, hf), index, files)
    config = family.parse_config(config_path, hf)
    tokenizer_file = find_tokenizer_file(folder)
    tokenizer = load_tokenizer(tokenizer_file)
    family.check_tokenizer(config, tokenizer, tokenizer_file)

    try:
        with torch.device("meta"):  # shapes only: no memory, whatever the sizes
            module = family.build(config)
    except RuntimeError as e:  # torch refuses shapes whose byte count overflows 64 bits
        raise ModelLoadError(config_path, f"sizes no model can have ({e})") from None
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
    # Quantized layers: their weights come from the sidecar, else are quantized as read.
    schemes: dict[str, quant.QuantMode] = {}
    portable: dict[str, dict[str, torch.Tensor]] | None = None
    sidecar, key = None, ""
    if mode is not None:
        if family is not dense.FAMILY:
            raise ModelLoadError(folder, f"quantize={mode!r} supports the dense and MoE "
                                 f"transformers, not the {family.name}")
        schemes = quant.plan(module, mode)
        key = quantized.fingerprint(config_path, files, mode, target_dtype)
        sidecar = quantized.sidecar_path(cache_dir, folder, mode, key)
        portable = quantized.read_sidecar(sidecar, key, schemes)
    fresh = portable is None
    quantized_layers = portable if portable is not None else {}
    weights = {f"{layer}.weight": layer for layer in schemes}
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for ours, (src, stored, _, _) in index.items():
                    if src != f or (ours in weights and not fresh):
                        continue
                    w = family.convert(ours, handle.get_tensor(stored), config, hf)
                    want = torch.float32 if family.keeps_float32(ours) else target_dtype
                    w = w.to(device=device, dtype=want).contiguous()
                    if ours in weights:
                        layer = weights[ours]
                        quantized_layers[layer] = quant.quantize(w, schemes[layer], want)
                    else:
                        state[ours] = w
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f, f"cannot read tensors ({e})") from None
    if tied is not None:
        output_layer = tied[0].removesuffix(".weight")
        if output_layer in schemes:  # quantized from the embedding table it shares
            if fresh:
                quantized_layers[output_layer] = quant.quantize(
                    state[tied[1]], schemes[output_layer], target_dtype)
        else:
            state[tied[0]] = state[tied[1]]
    if mode is not None:
        assert sidecar is not None
        if fresh:
            quantized.write_sidecar(sidecar, key, quantized_layers, folder)
        layers: dict[str, nn.Module] = {}
        for layer in schemes:  # one layer at a time: the portable copy goes as it is built
            layers[layer] = quant.build(quantized_layers.pop(layer), target_dtype, device)
        quant.install(module, layers)
    module.load_state_dict(state, assign=True, strict=True)
    module.eval().requires_grad_(False)
    if torch.device(device).type == "cpu":
        state.clear()  # so that each weight's first copy goes as it moves
        pages.to_huge_pages(module)
    log.info("loaded %s (%s, %s layout, %s, %s%s)", folder, family.name,
             "hf" if hf else "native", target_dtype, device,
             f", {mode} weights {'quantized' if fresh else 'read from ' + str(sidecar)}"
             if mode else "")
    return Checkpoint(module, config, tokenizer, folder, family.name, mode)
