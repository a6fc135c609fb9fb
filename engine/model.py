"""`Model`: the loaded network, its tokenizer and its config, as callers see them; `load`."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn

from .arch.cache import Cache
from .arch.config import MambaConfig, TransformerConfig
from .arch.lora import LoraAdapters
from .arch.quant import Int4Linear, Int8Linear
from .arch.transformer import EmbeddingOverride
from .checkpoints.loading import load_checkpoint
from .checkpoints.lora import read_adapter
from .errors import EngineError, GenerationError

T = TypeVar("T")


class DecodeStep(Protocol):
    """A faster implementation of one decode step for caches of one geometry (`FastDecoder`
    of `runtime.compiled`: the native or the compiled step), and of a prefill of a few tokens
    where `chunk_tokens` says so; the generation loop uses it where `accepts(cache)`."""

    batch_size: int
    max_seq_len: int

    compiled: bool
    chunk_tokens: int  # the most new tokens per row `prefill` takes (0: none)

    def accepts(self, cache: object) -> bool: ...

    def new_cache(self) -> Any: ...

    def step(self, tokens: torch.Tensor, positions: torch.Tensor,
             cache: Any = None) -> torch.Tensor: ...

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any,
                output_index: torch.Tensor) -> torch.Tensor: ...

    def greedy(self, tokens: torch.Tensor, positions: torch.Tensor,
               cache: Any) -> tuple[list[int], list[float]] | None: ...

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor,
               cache: Any) -> tuple[list[int], list[float]] | None: ...


class Model:
    """A checkpoint ready to run: `module` (PyTorch), `tokenizer` (mistral-common), `config`.

    Composition rather than an `nn.Module` subclass: the network stays plain PyTorch (easy to
    compile or swap for a faster kernel) and the engine's loop talks to this small surface.
    """

    def __init__(self, module: nn.Module, config: TransformerConfig | MambaConfig,
                 tokenizer: MistralTokenizer, path: Path, quantize: str | None = None) -> None:
        self.module = module
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        # "int8" / "int4": the linear layers hold weight-only quantized weights (`arch.quant`).
        self.quantize = quantize
        self._loras = LoraAdapters(module)
        # A compiled one-token step that the generation loop uses for caches of its geometry
        # (`engine.enable_fast_decode`); None = the eager forward for every step.
        self.decoder: DecodeStep | None = None
        # Compiled steps set aside, by the set of adapters loaded when they were built: loading
        # or unloading an adapter changes which layers are wrapped, which a compiled graph was
        # traced through (it would recompile on the spot, for tens of seconds).
        self._set_aside: dict[frozenset[str], DecodeStep] = {}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.instruct_tokenizer.tokenizer.eos_id)

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.instruct_tokenizer.tokenizer.bos_id)

    def num_parameters(self) -> int:
        """Weights of the network, quantized layers' counted as the weights they stand for."""
        quantized = sum(m.in_features * m.out_features for m in self.module.modules()
                        if isinstance(m, (Int8Linear, Int4Linear)))
        return sum(p.numel() for p in self.module.parameters()) + quantized

    def new_cache(self, batch_size: int, max_seq_len: int, rewind: int = 0) -> Cache:
        """An empty cache for `batch_size` sequences of up to `max_seq_len` positions, of the
        kind the architecture keeps (`rewind`: spare slots for cutting back, see `KVCache`).

        Always ordinary tensors, even when asked for inside `torch.inference_mode` (`generate`
        does): the compiled decode step guards on the dispatch keys of the cache it writes, and
        a cache of inference tensors would recompile it (seconds) for the other kind."""
        with torch.inference_mode(False):
            return self.module.new_cache(  # type: ignore[operator, no-any-return]
                batch_size, max_seq_len, rewind=rewind, device=self.device, dtype=self.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache,
                output_index: torch.Tensor | None = None,
                embeddings: EmbeddingOverride | None = None) -> torch.Tensor:
        if embeddings is None:
            return self.module(tokens, positions, cache, output_index)  # type: ignore[no-any-return]
        return self.module(tokens, positions, cache, output_index,  # type: ignore[no-any-return]
                           embeddings=embeddings)

    @property
    def has_vision(self) -> bool:
        """Whether images can go into prompts (a Pixtral checkpoint)."""
        return getattr(self.config, "vision", None) is not None

    def encode_images(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Images preprocessed by mistral-common (each (C, H, W)) -> one `(tokens, dim)` tensor
        of decoder embeddings per image, in one pass of the vision tower."""
        vision = getattr(self.module, "vision", None)
        if vision is None:
            raise GenerationError("this model has no vision encoder: images are not supported")
        with torch.inference_mode():
            return vision([p.to(self.device) for p in pixels])  # type: ignore[no-any-return]

    def load_lora(self, path: str | Path, scaling: float | None = None,
                  name: str | None = None) -> str:
        """Load a LoRA adapter (`lora.safetensors` or its folder) beside the others; returns its
        name (default: the folder's name, or the file's stem when it is not `lora`).

        `scaling=None` takes `lora.scaling` from the `params.json` beside the adapter, else 2.0.
        The adapter runs only inside `use_lora(name)`; the base weights are never changed.
        Not on a quantized model (its layers hold no weight an adapter can wrap, yet).
        """
        if self.quantize is not None:
            raise EngineError(f"LoRA adapters are not supported on a model loaded with "
                              f"quantize={self.quantize!r}: load it without quantize")
        adapter = read_adapter(path, self.module, scaling, name, loaded=self._loras.names)
        before = frozenset(self._loras.names)
        self._loras.attach(adapter.name, adapter.tensors, adapter.scaling)
        self._adapters_changed(before)
        return adapter.name

    def unload_lora(self, name: str) -> None:
        """Remove an adapter: the layers it touched compute exactly what they did before."""
        before = frozenset(self._loras.names)
        self._loras.unload(name)
        self._adapters_changed(before)

    def _adapters_changed(self, before: frozenset[str]) -> None:
        """Set the compiled step aside; bring back the one built for the adapters now loaded,
        if any (`engine.enable_fast_decode` builds one for them)."""
        if self.decoder is not None:
            self._set_aside[before] = self.decoder
        self.decoder = self._set_aside.pop(frozenset(self._loras.names), None)

    @property
    def loras(self) -> list[str]:
        """Names of the loaded adapters."""
        return self._loras.names

    @contextmanager
    def use_lora(self, name: str | None) -> Iterator[None]:
        """Run the body with adapter `name` (None: the base model), on this thread only:
        `with model.use_lora("python"): engine.generate(...)`."""
        with self._loras.use(name):
            yield

    def with_lora(self, name: str | None, steps: Iterable[T]) -> Generator[T, None, None]:
        """`steps` run with adapter `name`, one step at a time: what a generator needs
        (`for event in model.with_lora("python", engine.stream(...))`), where `use_lora`
        around it would leak the adapter to whatever the thread runs while it is suspended."""
        return self._loras.each_step(name, steps)

    @property
    def active_lora(self) -> str | None:
        """The adapter this thread runs with (None: the base model)."""
        return self._loras.active.name

    def __repr__(self) -> str:
        weights = f", {self.quantize} weights" if self.quantize else ""
        return (f"Model({self.path.name}, {self.num_parameters() / 1e6:.1f}M parameters, "
                f"{self.dtype}{weights}, {self.device})")


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, *, quantize: str | None = None,
         quantized_dir: str | Path | None = None) -> Model:
    """Load a native Mistral or Hugging Face checkpoint folder (any supported architecture).

    `quantize="int8"|"int4"` (dense and MoE transformers): weight-only quantized linear
    layers, quantized from the checkpoint on the first load and saved to a sidecar file in
    `quantized_dir` (default: the user's cache folder, `.../tramontane/quantized`) that the
    next load reads instead (`checkpoints/quantized.py` says how it is keyed to the
    checkpoint). `dtype` is then the activations' (default: the checkpoint's)."""
    checkpoint = load_checkpoint(path, device=device, dtype=dtype, quantize=quantize,
                                 quantized_dir=quantized_dir)
    return Model(checkpoint.module, checkpoint.config, checkpoint.tokenizer, checkpoint.path,
                 checkpoint.quantize)
