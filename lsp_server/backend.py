"""The one interface between the server and whatever runs the model.

A backend turns a token prompt into a stream of `engine.TokenEvent`s ended by one
`engine.EndEvent`. It is called on a worker thread and must stop within one decode step once
`cancel` is set. The local engine is the default; an OpenAI-compatible server (vLLM) and the
Mistral API fit the same shape.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine

Events = Generator["engine.TokenEvent | engine.EndEvent", None, None]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    sampling: engine.SamplingParams
    # Which document the prompt belongs to, so a backend can keep per-document state.
    document: str | None = None


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> MistralTokenizer: ...

    def stream(self, request: GenerationRequest,
               cancel: engine.CancellationToken) -> Events:
        ...


class LocalBackend:
    """The in-process engine."""

    def __init__(self, model: engine.Model) -> None:
        self.model = model

    @property
    def name(self) -> str:
        return self.model.path.name

    @property
    def tokenizer(self) -> MistralTokenizer:
        return self.model.tokenizer

    def stream(self, request: GenerationRequest,
               cancel: engine.CancellationToken) -> Events:
        return engine.stream(request.prompt, self.model, request.sampling, cancel=cancel)
