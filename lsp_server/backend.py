"""The one interface between the server and whatever runs the model.

A backend turns a token prompt into a stream of `engine.TokenEvent`s ended by one
`engine.EndEvent`. It is called on a worker thread and must stop within one decode step once
`cancel` is set. The local engine is the default; an OpenAI-compatible server (vLLM) and the
Mistral API fit the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine

from .settings import CacheSettings, CompletionSettings, default_cache_budget_mib

log = logging.getLogger(__name__)

Events = Generator["engine.TokenEvent | engine.EndEvent", None, None]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    sampling: engine.SamplingParams
    # Which document the prompt belongs to, so a backend can keep per-document state.
    document: str | None = None
    adapter: str | None = None  # a LoRA adapter the backend has loaded; None = the base model


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> MistralTokenizer: ...

    def stream(self, request: GenerationRequest,
               cancel: engine.CancellationToken) -> Events:
        ...

    def forget(self, document: str) -> None:
        """Drop whatever per-document state the backend keeps (the document was closed)."""
        ...


# Prompt tokens per prefill step: a superseded request stops within one step, and what it
# computed stays in the document's prefix cache for the next keystroke.
PREFILL_CHUNK = 256
# Room in each document's cache for the generated tokens and for edits behind the cursor
# (sliding-window layers): see `engine.PrefixCache`.
REWIND = 512


def context_tokens(settings: CompletionSettings) -> int:
    """Positions a completion can need: the prompt's budgets, FIM's special tokens, the output;
    rounded up so that small settings changes keep the same geometry."""
    needed = settings.prefix_tokens + settings.suffix_tokens + settings.max_tokens + 16
    return -(-needed // 256) * 256


class LocalBackend:
    """The in-process engine, with a prefix KV cache per document once `configure_cache` (or
    `create`) has sized one."""

    def __init__(self, model: engine.Model) -> None:
        self.model = model
        self.prefix_cache: engine.PrefixCache | None = None
        self._adapter_paths: dict[str, str] = {}

    @classmethod
    def create(cls, model: engine.Model, completion: CompletionSettings, cache: CacheSettings,
               compile: bool) -> LocalBackend:
        """The backend the server runs: caches sized for `completion`'s budgets and, when
        `compile`, a compiled decode step of the same geometry (slow: call it off the loop)."""
        backend = cls(model)
        backend.configure_cache(completion, cache)
        if compile:
            backend.compile(completion)
        return backend

    def compile(self, completion: CompletionSettings, *, eager: bool = False) -> None:
        """(Re)build the compiled decode step for the cache geometry of `completion`'s budgets;
        slow (seconds): call it on the engine thread. `eager` builds it uncompiled (tests)."""
        try:
            engine.enable_fast_decode(self.model, context_tokens(completion), 1, REWIND,
                                          compile=not eager)
        except engine.EngineError as e:  # an architecture it does not support
            log.info("decoding eagerly: %s", e)

    def configure_cache(self, completion: CompletionSettings, cache: CacheSettings) -> None:
        """Size the prefix caches for `completion`'s budgets. A compiled decode step built for
        other budgets is rebuilt (seconds: call this on the engine thread)."""
        decoder = self.model.decoder
        if decoder is not None and decoder.max_seq_len != context_tokens(completion):
            self.compile(completion, eager=not decoder.compiled)
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.prefix_cache = None
        if cache.enabled:
            budget = cache.budget_mib if cache.budget_mib is not None \
                else default_cache_budget_mib()
            self.prefix_cache = engine.PrefixCache(
                self.model, max_seq_len=context_tokens(completion), budget_bytes=budget * 2**20,
                rewind=REWIND)

    @property
    def name(self) -> str:
        return self.model.path.name

    @property
    def tokenizer(self) -> MistralTokenizer:
        return self.model.tokenizer

    def stream(self, request: GenerationRequest,
               cancel: engine.CancellationToken) -> Events:
        adapter = request.adapter
        # The cached keys and values depend on the adapter: one cache per (document, adapter).
        key = request.document if adapter is None else (request.document, adapter)
        events = engine.stream(request.prompt, self.model, request.sampling, cancel=cancel,
                               chunk_size=PREFILL_CHUNK, prefix_cache=self.prefix_cache,
                               cache_key=key if request.document is not None else None)
        return events if adapter is None else self.model.with_lora(adapter, events)

    def forget(self, document: str) -> None:
        """The document was closed: free its caches."""
        if self.prefix_cache is not None:
            self.prefix_cache.drop(document)
            for adapter in self.model.loras:
                self.prefix_cache.drop((document, adapter))

    def sync_adapters(self, wanted: dict[str, str]) -> list[str]:
        """Load and unload LoRA adapters so that exactly `wanted` ({name: path}) are loaded.
        Returns one message per adapter that could not be loaded. Call it on the engine thread
        (adapters change the model's layers)."""
        problems = []
        for name in self.model.loras:
            if name not in wanted or self._adapter_paths.get(name) != wanted[name]:
                self.model.unload_lora(name)
                self._adapter_paths.pop(name, None)
                self._drop_adapter_caches(name)
        for name, path in wanted.items():
            if name in self.model.loras:
                continue
            try:
                self.model.load_lora(path, name=name)
                self._adapter_paths[name] = path
            except engine.EngineError as e:
                problems.append(f"LoRA adapter {name!r} not loaded: {e}")
        return problems

    def _drop_adapter_caches(self, adapter: str) -> None:
        if self.prefix_cache is not None:
            for key in self.prefix_cache.cached_keys():
                if isinstance(key, tuple) and key[1] == adapter:
                    self.prefix_cache.drop(key)
