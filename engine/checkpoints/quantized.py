"""Quantized weights saved beside a checkpoint's identity: the next load reads them instead of
quantizing again.

A sidecar is one safetensors file per (checkpoint, mode) in a cache folder (default
`platformdirs.user_cache_dir("tramontane")/quantized`, e.g. ~/.cache/tramontane/quantized),
never in the checkpoint folder itself (often read-only, or shared: a Hugging Face cache). It
holds the portable form of every quantized layer (`arch.quant.quantize`) as
`<layer>.{q8,q4,scale,zero}`, and in its metadata the key it was written for.

The key is a SHA-256 over: the quantization format version and mode, the dtype the scales were
rounded to, the config file's bytes, and for each weight file its name, size, safetensors
header (every tensor's name, dtype, shape and offsets) and 64 blocks of 4 KiB sampled evenly
through its data. Invalidation: any change to the config or to a header, a file of another
size, or new values in a sampled block gives another key, so another file name; the old file
is then never read again (and is replaced when the same checkpoint folder is quantized anew:
one sidecar per folder name and mode). Reading the samples costs milliseconds where hashing a
44 GB checkpoint whole would cost most of a minute. Not detected: a rewrite that keeps every
header and file size and changes no sampled block, e.g. a few weights edited in place: delete
the sidecar (its name starts with the folder's name) to quantize again.

A sidecar that cannot be read (truncated, another key inside, missing tensors) is ignored with
a log line and written again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..arch.quant import FORMAT_VERSION, QuantMode

log = logging.getLogger(__name__)

SAMPLES = 64
SAMPLE_BYTES = 4096
KEY_FIELD = "tramontane.quantized.key"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("tramontane")) / "quantized"


def _file_digest(path: Path, h: hashlib._Hash) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(header_len, size))
        h.update(f"{path.name}\0{size}\0".encode())
        h.update(header)
        start = 8 + len(header)
        span = max(0, size - start - SAMPLE_BYTES)
        for i in range(SAMPLES):
            f.seek(start + span * i // max(1, SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def fingerprint(config_path: Path, files: list[Path], mode: QuantMode,
                dtype: torch.dtype) -> str:
    """The key of a checkpoint's quantized weights (see the module docstring)."""
    h = hashlib.sha256(f"tramontane-quantized v{FORMAT_VERSION} {mode} {dtype}\0".encode())
    h.update(config_path.read_bytes())
    for path in sorted(files):
        _file_digest(path, h)
    return h.hexdigest()


def sidecar_path(cache_dir: Path, folder: Path, mode: QuantMode, key: str) -> Path:
    """`<folder name>-<mode>-<key prefix>.safetensors`: readable names, one file per key."""
    return cache_dir / f"{folder.resolve().name}-{mode}-{key[:16]}.safetensors"


def read_sidecar(path: Path, key: str,
                 layers: dict[str, QuantMode]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The portable tensors of every layer of `layers`, or None if the file is absent, was
    written for another key, or lacks a layer."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get(KEY_FIELD) != key:
                log.info("%s: written for another checkpoint: quantizing again", path)
                return None
            names = set(f.keys())
            out: dict[str, dict[str, torch.Tensor]] = {}
            for layer, scheme in layers.items():
                parts = ("q8", "scale") if scheme == "int8" else ("q4", "scale", "zero")
                if not all(f"{layer}.{p}" in names for p in parts):
                    log.info("%s: no %s weights for %s: quantizing again", path, scheme, layer)
                    return None
                out[layer] = {p: f.get_tensor(f"{layer}.{p}") for p in parts}
            return out
    except (SafetensorError, OSError) as e:
        log.warning("%s: unreadable (%s): quantizing again", path, e)
        return None


def write_sidecar(path: Path, key: str, portable: dict[str, dict[str, torch.Tensor]],
                  folder: Path) -> None:
    """Write atomically (a temporary file renamed), replacing older sidecars of the same folder
    name and mode. A cache folder that cannot be written costs the next load a quantization,
    nothing else: it is logged, not raised."""
    tensors = {f"{layer}.{part}": t.contiguous() for layer, parts in portable.items()
               for part, t in parts.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = path.name.rsplit("-", 1)[0] + "-"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={KEY_FIELD: key, "source": str(folder)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in path.parent.glob(f"{prefix}*.safetensors"):
            stem = old.name[len(prefix):-len(".safetensors")]
            if old != path and len(stem) == 16 and all(c in "0123456789abcdef" for c in stem):
                old.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not save the quantized weights to %s (%s): the next load quantizes "
                    "again", path, e)
        return
    log.info("saved the quantized weights to %s", path)
