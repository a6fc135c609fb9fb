"""The files of a checkpoint folder: JSON configs, safetensors headers, the index of stored
tensors, the checks every architecture's loader shares. Pickle files are refused, never read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Our name of a weight -> (file, stored name, shape, dtype)
TensorIndex = dict[str, tuple[Path, str, tuple[int, ...], torch.dtype]]


# transformers 5.2x writes the floats strict JSON has no token for as {"__float__": "Infinity"}
# (e.g. Mamba2's `time_step_limit`); older files, and Python's json, write the bare `Infinity`,
# which `json.loads` reads as it is.
_FLOAT_TAG = "__float__"
_FLOAT_TAG_VALUES = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# The safetensors format's own limit on the header (the library refuses larger ones).
MAX_SAFETENSORS_HEADER = 100_000_000


def _tagged_float(obj: dict[str, Any]) -> Any:
    if obj.keys() == {_FLOAT_TAG} and obj[_FLOAT_TAG] in _FLOAT_TAG_VALUES:
        return _FLOAT_TAG_VALUES[obj[_FLOAT_TAG]]
    return obj


def parse_json(text: str | bytes, path: Path, what: str = "not valid JSON") -> Any:
    """`text` decoded, both spellings of infinity read as floats; a `ModelLoadError` naming
    `path` for anything else than JSON, including nesting too deep for Python's parser (which
    raises `RecursionError`, not a decoding error)."""
    try:
        return json.loads(text, object_hook=_tagged_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"{what} ({e})") from None
    except RecursionError:
        raise ModelLoadError(path, f"{what} (nested too deeply)") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a `ModelLoadError` saying what is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(path, "file not found") from None
    except OSError as e:  # a folder of that name, no permission, an I/O error
        raise ModelLoadError(path, f"cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(path, f"not valid JSON ({e})") from None
    data = parse_json(text, path)
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object at the top level")
    return data


def config_float(data: dict[str, Any], key: str, default: float, path: Path) -> float:
    """`data[key]` (or `default`) as a float: a number, or infinity in either spelling (read by
    `read_json`); a `ModelLoadError` naming the field otherwise."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(path, f"{key} must be a number, got {value!r}")
    return float(value)


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes of a safetensors file, checking it is complete.

    Reading the header ourselves gives exact messages for truncated or foreign files (the
    library would only fail later, or with a generic error).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(path, f"not a safetensors file ({size} bytes, truncated?)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                raise ModelLoadError(
                    path, f"truncated or not a safetensors file: the header claims {header_len} "
                    f"bytes but the file has {size}")
            if header_len > MAX_SAFETENSORS_HEADER:
                raise ModelLoadError(
                    path, f"not a safetensors file: a header of {header_len} bytes (the format "
                    f"allows {MAX_SAFETENSORS_HEADER})")
            raw = f.read(header_len)
    except OSError as e:
        raise ModelLoadError(path, f"unreadable safetensors header ({e})") from None
    header = parse_json(raw, path, "unreadable safetensors header")
    if not isinstance(header, dict):
        raise ModelLoadError(path, "unreadable safetensors header")
    header.pop("__metadata__", None)
    tensors = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ModelLoadError(path, f"bad header entry for tensor {name!r}") from None
        tensors[name] = (dtype, shape)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            path, f"truncated: its tensors need {8 + header_len + data_end} bytes, the file "
            f"has {size} (re-download it)")
    return tensors


def check_not_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            path, "pickle checkpoints are refused (loading one can run arbitrary code); use the "
            "model's .safetensors files")


def native_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            check_not_pickle(pickles[0])
        raise ModelLoadError(folder, "no consolidated.safetensors next to params.json")
    return files


def hf_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(index, "no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f, f"listed in {index.name} but missing")
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            check_not_pickle(pickles[0])
        raise ModelLoadError(folder, "no model.safetensors next to config.json")
    return files


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")


def index_tensors(files: Iterable[Path], rename: Callable[[str], str | None],
                  kind: str) -> TensorIndex:
    """Where each weight is, from the files' headers only (no tensor is read); `rename` maps a
    stored name to ours, or to None for a tensor that is not a `kind` weight."""
    index: TensorIndex = {}
    for f in files:
        for stored, (dtype, shape) in read_safetensors_header(f).items():
            ours = rename(stored)
            if ours is None:
                raise ModelLoadError(f, f"unexpected tensor {stored!r} (not a {kind} weight)")
            index[ours] = (f, stored, shape, dtype)
    return index


def check_tensors(index: TensorIndex, expected: dict[str, tuple[int, ...]], first_file: Path, *,
                  stored_name: Callable[[str], str] = lambda name: name,
                  unexpected_hint: str = "") -> None:
    """Every expected tensor is stored with its shape, and nothing else is: otherwise a
    `ModelLoadError` naming the file and the tensor (as `stored_name` spells it)."""
    for name, shape in expected.items():
        if name not in index:
            raise ModelLoadError(first_file, f"missing tensor {stored_name(name)!r}")
        f, stored, got, _ = index[name]
        if got != shape:
            raise ModelLoadError(f, f"tensor {stored!r} has shape {list(got)}, the config "
                                 f"implies {list(shape)}")
    extra = sorted(set(index) - set(expected))
    if extra:
        f, stored, _, _ = index[extra[0]]
        raise ModelLoadError(f, f"unexpected tensor {stored!r}{unexpected_hint}")
