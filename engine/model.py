"""`Model`: the loaded network, its tokenizer and its config, as callers see them."""

from __future__ import annotations

from pathlib import Path

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn

from .cache import KVCache
from .config import TransformerConfig


class Model:
    """A checkpoint ready to run: `module` (PyTorch), `tokenizer` (mistral-common), `config`.

    Composition rather than an `nn.Module` subclass: the network stays plain PyTorch (easy to
    compile or swap for a faster kernel) and the engine's loop talks to this small surface.
    """

    def __init__(self, module: nn.Module, config: TransformerConfig, tokenizer: MistralTokenizer,
                 path: Path) -> None:
        self.module = module
        self.config = config
        self.tokenizer = tokenizer
        self.path = path

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
        return sum(p.numel() for p in self.module.parameters())

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_seq_len, device=self.device, dtype=self.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                output_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(tokens, positions, cache, output_index)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return (f"Model({self.path.name}, {self.num_parameters() / 1e6:.1f}M parameters, "
                f"{self.dtype}, {self.device})")
