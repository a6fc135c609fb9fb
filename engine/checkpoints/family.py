"""What the loader needs to know of one architecture's checkpoints.

Each architecture (dense transformer and its MoE variant, Mamba2, ...) has one module in this
package that describes its checkpoints with a `Family`: how to recognise its config file, parse
it, build the empty network, and translate weight names and layouts. `loading.FAMILIES` lists
them; the loader itself is the same for all. Adding an architecture is a new module here and one
line in that list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn


class BlockCount(NamedTuple):
    """How many repeated blocks (layers, experts) a config declares, as its file writes it."""

    field: str  # as the config file names it, e.g. "n_layers" or "num_hidden_layers"
    value: object  # the raw value: the family's parser says what is wrong if it is no integer
    pattern: re.Pattern[str]  # its first group numbers the blocks in our tensor names
    noun: str  # for messages: "layers", "experts"


class Family(Protocol):
    @property
    def name(self) -> str:
        """How error messages name it, e.g. "Mistral dense transformer"."""
        ...

    def claims(self, data: dict[str, Any], hf: bool) -> bool:
        """Whether a folder whose `params.json` (or, `hf`, `config.json`) holds `data` is ours."""
        ...

    def block_counts(self, data: dict[str, Any], hf: bool) -> list[BlockCount]:
        """The counts of repeated blocks in a config file's `data`. The loader checks each
        against the blocks the safetensors headers hold before the config is parsed or the
        network built: parsing and building take memory in proportion to these counts (a
        `params.json` claiming 10^9 layers must fail at once, not after 4 GB)."""
        ...

    def parse_config(self, path: Path, hf: bool) -> Any:
        """The frozen config of `path`; `ModelLoadError` for what cannot be used."""
        ...

    def build(self, config: Any) -> nn.Module:
        """The network, with parameters on the current (meta) device."""
        ...

    def rename(self, stored: str, hf: bool) -> str | None:
        """Our module name of a stored tensor, None if it is not one of this family's."""
        ...

    def stored_name(self, ours: str, hf: bool) -> str:
        """The stored name of one of our tensors (for messages)."""
        ...

    def tied(self, config: Any) -> tuple[str, str] | None:
        """(output weight, embedding weight) when the config ties them: the output is then not
        stored, and shares the embedding's tensor."""
        ...

    def convert(self, ours: str, tensor: torch.Tensor, config: Any, hf: bool) -> torch.Tensor:
        """A stored tensor in our layout (e.g. q/k rows from Hugging Face's rotary order)."""
        ...

    def keeps_float32(self, ours: str) -> bool:
        """Whether this tensor stays float32 whatever dtype the model is loaded in."""
        ...

    def check_tokenizer(self, config: Any, tokenizer: MistralTokenizer, path: Path) -> None:
        """`ModelLoadError` if the folder's tokenizer cannot serve this model (e.g. a vision
        model's tokenizer must cut images as its encoder expects)."""
        ...
