"""Shared fixtures: tiny random checkpoints with real mistral-common tokenizers, on disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine.arch import kernels
from engine.checkpoints.tiny import make_tiny, random_state_dict, tiny_config, write_checkpoint

CheckpointFactory = Callable[..., Path]


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """The C++ kernels run the loops of one instruction set (each that this CPU has, in turn;
    `kernels.instruction_set_capped`)."""
    if not kernels.available():
        pytest.skip("the C++ kernels are not built here (python -m engine.arch.kernels)")
    if request.param not in kernels.cpu_instruction_sets():
        pytest.skip(f"this CPU does not run the {request.param} loops")
    with kernels.instruction_set_capped(request.param) as running:
        assert running == request.param
        yield running


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


@pytest.fixture(scope="session")
def make_pixtral(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`make_pixtral(layout="native"|"hf", patch_merge=False, seed=0) -> folder`: a tiny random
    Pixtral (Pixtral 12B's image cutting; Mistral Small 3.1's with `patch_merge`) with the
    tekken tokenizer. Same arguments, same folder; same seed, same weights in both layouts."""
    built: dict[tuple[object, ...], Path] = {}

    def make(layout: str = "native", patch_merge: bool = False, seed: int = 0) -> Path:
        key = (layout, patch_merge, seed)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"pixtral-{layout}")
            built[key] = make_tiny(folder, layout=layout, arch="pixtral", seed=seed,
                                   patch_merge=patch_merge)
        return built[key]

    return make
