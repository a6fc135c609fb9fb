"""LoRA adapter files (mistral-finetune's `lora.safetensors`): find, check against a model, read.

Every tensor is checked before anything is returned, so a bad adapter never reaches the model:
a shape that does not fit its layer, a rank other than `params.json`'s, a dtype that does not
convert exactly to the model's, a module the model lacks or that is not a linear layer, a
`lora_A` without its `lora_B`, a tensor that is not a LoRA weight, a pickle file. The layers that
run adapters are in `arch/lora.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..arch.lora import LoRALinear
from ..errors import ModelLoadError
from .files import read_json, read_safetensors_header

DEFAULT_SCALING = 2.0
ADAPTER_FILE = "lora.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Adapter dtypes that convert to the model's without rounding (anything else is an error).
_EXACT_CASTS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what `engine.load` takes


@dataclass(frozen=True)
class AdapterFile:
    """An adapter read and checked: its name, scaling, and `(A, B)` per adapted module."""

    name: str
    scaling: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_adapter(path: str | Path, module: nn.Module, scaling: float | None = None,
                 name: str | None = None, loaded: Collection[str] = ()) -> AdapterFile:
    """Read `lora.safetensors` (or a folder holding it) for `module`, in its dtype and device.

    The name is `name`, else the folder's name (or the file's stem when it is not `lora`); it
    must not be one of `loaded`. The scaling is `scaling`, else `lora.scaling` of the
    `params.json` beside the adapter, else 2.0 (mistral-finetune's default).
    """
    path = Path(path).expanduser()
    file = _adapter_file(path)
    name = name if name is not None else _default_name(path, file)
    if not isinstance(name, str) or not name:
        raise ModelLoadError(file, f"adapter name must be a non-empty string, got {name!r}")
    params = _params_lora(file)
    if scaling is not None:
        scaling = _check_scaling(scaling, file)
    elif "scaling" in params:
        scaling = _check_scaling(params["scaling"], file.parent / "params.json")
    else:
        scaling = DEFAULT_SCALING
    if name in loaded:
        raise ModelLoadError(file, f"an adapter named {name!r} is already loaded; unload it "
                             "first or pass another name")
    rank = params.get("rank")
    tensors = _read(module, file, rank if isinstance(rank, int) else None)
    return AdapterFile(name, scaling, tensors)


def _adapter_file(path: Path) -> Path:
    if path.is_dir():
        file = path / ADAPTER_FILE
        if not file.is_file():
            raise ModelLoadError(path, f"no {ADAPTER_FILE} in this folder")
        return file
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise ModelLoadError(path, "pickle files are refused (loading one can run arbitrary "
                             "code); use the adapter's .safetensors file")
    if not path.is_file():
        raise ModelLoadError(path, "file not found")
    return path


def _default_name(path: Path, file: Path) -> str:
    if path.is_dir():
        return path.resolve().name
    return file.resolve().parent.name if file.stem == "lora" else file.stem


def _params_lora(file: Path) -> dict[str, object]:
    """The `lora` part of the `params.json` beside the adapter, if any."""
    params = file.parent / "params.json"
    if not params.is_file():
        return {}
    lora = read_json(params).get("lora")
    if lora is None:
        return {}
    if not isinstance(lora, dict):
        raise ModelLoadError(params, f"lora must be an object, got {lora!r}")
    return lora


def _check_scaling(value: object, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelLoadError(source, f"LoRA scaling must be a finite number, got {value!r}")
    return float(value)


def _read(module: nn.Module, file: Path,
          rank: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Check the adapter against the model and read it, in the model's dtype and device."""
    header = read_safetensors_header(file)
    if not header:
        raise ModelLoadError(file, "no LoRA weights in this file")
    modules = dict(module.named_modules())
    parts: dict[str, dict[str, str]] = {}
    for key in header:
        m = _KEY.match(key)
        if m is None:
            raise ModelLoadError(file, f"tensor {key!r} is not a LoRA weight (expected "
                                 "'<module>.lora_A.weight' or '<module>.lora_B.weight')")
        target = m["module"]
        if not isinstance(modules.get(target), (nn.Linear, LoRALinear)):
            raise ModelLoadError(file, f"tensor {key!r}: the model has no linear layer "
                                 f"{target!r}")
        parts.setdefault(target, {})[m["part"]] = key
    for target, found in parts.items():
        for part, other in (("A", "B"), ("B", "A")):
            if part not in found:
                raise ModelLoadError(file, f"tensor {found[other]!r} has no "
                                     f"'{target}.lora_{part}.weight' to go with it")
    weight = next(module.parameters())
    dtype, device = weight.dtype, weight.device
    for target, found in parts.items():
        layer = modules[target]
        out_features, in_features = layer.weight.shape
        a_dtype, a_shape = header[found["A"]]
        b_dtype, b_shape = header[found["B"]]
        r = a_shape[0] if len(a_shape) == 2 else -1
        if len(a_shape) != 2 or a_shape[1] != in_features or r == 0:
            raise ModelLoadError(file, f"tensor {found['A']!r} has shape {list(a_shape)}, "
                                 f"the layer needs [rank, {in_features}]")
        if rank is not None and r != rank:
            raise ModelLoadError(file, f"tensor {found['A']!r} has rank {r}, params.json "
                                 f"says {rank}")
        if b_shape != (out_features, r):
            raise ModelLoadError(file, f"tensor {found['B']!r} has shape {list(b_shape)}, "
                                 f"expected {[out_features, r]}")
        for key, got in ((found["A"], a_dtype), (found["B"], b_dtype)):
            if got != dtype and (got, dtype) not in _EXACT_CASTS:
                hint = (f"load the model with dtype='{_dtype_name(got)}' or convert the "
                        "adapter" if got in _MODEL_DTYPES else
                        f"convert the adapter to {_dtype_name(dtype)}")
                raise ModelLoadError(file, f"tensor {key!r} is {_dtype_name(got)}, the "
                                     f"model is {_dtype_name(dtype)}: {hint}")
    tensors = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for target, found in parts.items():
                a, b = (handle.get_tensor(found[p]).to(device=device, dtype=dtype)
                        for p in ("A", "B"))
                tensors[target] = (a.contiguous(), b.contiguous())
    except SafetensorError as e:
        raise ModelLoadError(file, f"cannot read tensors ({e})") from None
    return tensors

