"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on a loaded model.

An adapter is a pair of low-rank matrices per linear layer, `A: [r, in]` and `B: [out, r]`, as
mistral-finetune saves them in `lora.safetensors` (`layers.N.<module>.lora_A.weight`, q/k rows in
the native rotary layout: our weights are native whatever the checkpoint's layout). The layer
computes `W x + scaling * B (A x)`, which is `(W + scaling * B @ A) x` up to rounding. The
scaling comes from the argument, else from the `lora.scaling` of the `params.json` that
mistral-finetune writes beside the adapter, else 2.0 (mistral-finetune's default).

Design, and its trade-offs:

- The base weight is never modified. A layer that some adapter targets is swapped for a
  `LoRALinear` holding the very same weight `Parameter` (no copy; the state dict keeps its
  names) and any number of named adapters. Unloading the last adapter of a layer puts a plain
  `nn.Linear` back, so unloading restores the base model bit for bit, and the types the compiled
  fast decoder checks for.
- Adapters are not merged into the weights: merging would make switching adapters cost a pass
  over the weights and make unloading exact only by keeping a copy. The price is two thin
  matmuls per adapted layer while an adapter is active; with none active, a `LoRALinear` runs
  exactly the base matmul.
- The active adapter is chosen per thread (`use`): a request on the engine thread with one
  adapter cannot change what another thread computes.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import EngineError, ModelLoadError

T = TypeVar("T")

DEFAULT_SCALING = 2.0
ADAPTER_FILE = "lora.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Adapter dtypes that convert to the model's without rounding (anything else is an error).
_EXACT_CASTS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what `engine.load` takes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ActiveAdapter(threading.local):
    """The adapter each thread runs with (None: the base model)."""

    name: str | None = None


@dataclass(frozen=True)
class Adapter:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float


class LoRALinear(nn.Module):
    """A bias-free linear layer with a frozen base weight and named low-rank adapters."""

    def __init__(self, base: nn.Linear, active: ActiveAdapter) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # the same Parameter: same storage, same state-dict name
        self.adapters: dict[str, Adapter] = {}
        self.active = active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        name = self.active.name
        adapter = self.adapters.get(name) if name is not None else None
        if adapter is None:
            return y
        return y + F.linear(F.linear(x, adapter.a), adapter.b) * adapter.scaling

    def to_linear(self) -> nn.Linear:
        """The plain layer this one wraps (the same weight Parameter)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={sorted(self.adapters)}")


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
    from .config import read_json

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


class LoraAdapters:
    """The adapters loaded on one model, and which one each thread uses."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.active = ActiveAdapter()
        self._targets: dict[str, list[str]] = {}  # adapter name -> module names it adapts
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._targets)

    def load(self, path: str | Path, scaling: float | None = None,
             name: str | None = None) -> str:
        """Load `lora.safetensors` (or a folder holding it); returns the adapter's name.

        Every tensor is checked before the model changes: a bad adapter leaves it as it was.
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
        rank = params.get("rank")
        with self._lock:
            if name in self._targets:
                raise ModelLoadError(file, f"an adapter named {name!r} is already loaded; "
                                     "unload it first or pass another name")
            tensors = self._read(file, rank if isinstance(rank, int) else None)
            modules = dict(self.module.named_modules())
            for target, (a, b) in tensors.items():
                layer = modules[target]
                if isinstance(layer, nn.Linear):
                    layer = LoRALinear(layer, self.active)
                    parent, _, child = target.rpartition(".")
                    setattr(modules[parent] if parent else self.module, child, layer)
                assert isinstance(layer, LoRALinear)
                layer.adapters[name] = Adapter(a, b, scaling)
            self._targets[name] = list(tensors)
        return name

    def _read(self, file: Path, rank: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Check the adapter against the model and read it, in the model's dtype and device."""
        from .loading import read_safetensors_header  # loading imports the model, which uses us

        header = read_safetensors_header(file)
        if not header:
            raise ModelLoadError(file, "no LoRA weights in this file")
        modules = dict(self.module.named_modules())
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
        weight = next(self.module.parameters())
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

    def unload(self, name: str) -> None:
        """Remove an adapter; layers left with none become plain `nn.Linear` again."""
        with self._lock:
            if name not in self._targets:
                raise EngineError(f"no LoRA adapter named {name!r} is loaded "
                                  f"(loaded: {self.names})")
            modules = dict(self.module.named_modules())
            for target in self._targets.pop(name):
                layer = modules[target]
                assert isinstance(layer, LoRALinear)
                del layer.adapters[name]
                if not layer.adapters:
                    parent, _, child = target.rpartition(".")
                    setattr(modules[parent] if parent else self.module, child, layer.to_linear())

    def _check(self, name: str | None) -> None:
        if name is not None and name not in self._targets:
            raise EngineError(f"no LoRA adapter named {name!r} is loaded (loaded: {self.names})")

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the body with adapter `name` (None: the base model) on this thread only."""
        self._check(name)
        previous = self.active.name
        self.active.name = name
        try:
            yield
        finally:
            self.active.name = previous

    def each_step(self, name: str | None, steps: Iterable[T]) -> Generator[T, None, None]:
        """`steps` (e.g. `engine.stream(...)`) with adapter `name` active while each step runs
        and only then: a `with use(...)` around a generator would stay active on the thread
        while the generator is suspended, for whatever else the thread does meanwhile."""
        self._check(name)
        return self._each_step(name, iter(steps))

    def _each_step(self, name: str | None, steps: Iterator[T]) -> Generator[T, None, None]:
        try:
            while True:
                with self.use(name):
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                yield item
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                with self.use(name):
                    close()
