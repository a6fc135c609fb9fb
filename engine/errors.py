"""The engine's errors: one root class, so callers can catch all the engine raises on purpose."""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Root of every error the engine raises deliberately."""


class ModelLoadError(EngineError):
    """A checkpoint folder or file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class GenerationError(EngineError):
    """A request cannot be run on this model (prompt too long, empty prompt, bad token ids)."""


class ImageError(EngineError):
    """An image cannot be used: unsupported format, corrupt, too large, degenerate, too many.
    The message says which and why (it is meant for the person who sent the image)."""
