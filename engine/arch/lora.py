"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on a loaded model.

An adapter is a pair of low-rank matrices per linear layer, `A: [r, in]` and `B: [out, r]`, as
mistral-finetune saves them in `lora.safetensors` (`layers.N.<module>.lora_A.weight`, q/k rows in
the native rotary layout: our weights are native whatever the checkpoint's layout; reading and
checking the file is `checkpoints/lora.py`'s job). The layer
computes `W x + scaling * B (A x)`, which is `(W + scaling * B @ A) x` up to rounding. The
scaling comes from the argument, else from the `lora.scaling` of the `params.json` that
mistral-finetune writes beside the adapter, else 2.0 (mistral-finetune's default).

Design, and its trade-offs:

- The base weight is never modified. A layer that some adapter targets is swapped for a
  `LoRALinear` holding the very same weight `Parameter` (no copy; the state dict keeps its
  names) and any number of named adapters. Unloading the last adapter of a layer puts a plain
  `Linear` back, so unloading restores the base model bit for bit.
- Adapters are not merged into the weights: merging would make switching adapters cost a pass
  over the weights and make unloading exact only by keeping a copy. The price is two thin
  matmuls per adapted layer while an adapter is active; with none active, a `LoRALinear` runs
  exactly the base matmul.
- The active adapter is chosen per thread (`use`): a request on the engine thread with one
  adapter cannot change what another thread computes.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EngineError
from .layers import Linear, linear

T = TypeVar("T")


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

    def __init__(self, base: Linear, active: ActiveAdapter) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # the same Parameter: same storage, same state-dict name
        self.adapters: dict[str, Adapter] = {}
        self.active = active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        name = self.active.name
        adapter = self.adapters.get(name) if name is not None else None
        if adapter is None:
            return y
        return y + F.linear(F.linear(x, adapter.a), adapter.b) * adapter.scaling

    def to_linear(self) -> Linear:
        """The plain layer this one wraps (the same weight Parameter)."""
        plain = Linear(self.in_features, self.out_features, device="meta")
        plain.weight = self.weight
        return plain

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={sorted(self.adapters)}")


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

    def attach(self, name: str, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               scaling: float) -> None:
        """Add adapter `name`: `tensors` maps each adapted linear layer's module name to its
        `(A, B)` pair, already checked against the model (`checkpoints.lora.read_adapter`)."""
        with self._lock:
            if name in self._targets:
                raise EngineError(f"an adapter named {name!r} is already loaded; unload it "
                                  "first or pass another name")
            modules = dict(self.module.named_modules())
            for target, (a, b) in tensors.items():
                layer = modules[target]
                if isinstance(layer, Linear):
                    layer = LoRALinear(layer, self.active)
                    parent, _, child = target.rpartition(".")
                    setattr(modules[parent] if parent else self.module, child, layer)
                assert isinstance(layer, LoRALinear)
                layer.adapters[name] = Adapter(a, b, scaling)
            self._targets[name] = list(tensors)

    def unload(self, name: str) -> None:
        """Remove an adapter; layers left with none become plain `Linear` again."""
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
