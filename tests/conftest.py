"""Shared fixtures: tiny random checkpoints with real mistral-common tokenizers, on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.checkpoints.tiny import random_state_dict, tiny_config, write_checkpoint

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`make_checkpoint(layout="native"|"hf", tokenizer="v3", seed=0, **shape) -> folder`.

    The same arguments give the same folder (built once per session); the same seed and shape
    give the same weights in both layouts.
    """
    built: dict[tuple[object, ...], Path] = {}

    def make(layout: str = "native", tokenizer: str = "v3", seed: int = 0,
             dtype: torch.dtype = torch.float32, **shape: object) -> Path:
        key = (layout, tokenizer, seed, dtype, tuple(sorted((k, str(v)) for k, v in
                                                              shape.items())))
        if key not in built:
            config = tiny_config(tokenizer, **shape)  # type: ignore[arg-type]
            folder = tmp_path_factory.mktemp(f"tiny-{layout}-{tokenizer}")
            built[key] = write_checkpoint(folder, config, random_state_dict(config, seed, dtype),
                                          layout=layout, tokenizer=tokenizer)
        return built[key]

    return make
