"""The in-process engine as a backend: it owns the model's life (loading, LoRA adapters, prefix
cache sizing, the compiled decode step) and runs every request as a job on the engine thread.

Life of the model, as the settings drive it (`configure`):

- `model` names a checkpoint folder: it is loaded on the engine thread (torch's OpenMP team
  belongs to the thread that starts it: a model loaded and run from different threads decoded
  20-30% slower here); the status is `loading`, then `ready` as soon as the weights are in;
- completions run at once on the eager path; with `compile` on, the one-token decode step is
  compiled on a background thread of its own (20-35 s the first time for a small model on 2
  cores, a few seconds once inductor's disk cache has it) and swapped in between two engine
  steps; the status then says the fast path is in use;
- the prompt budgets size the per-document prefix caches (and the compiled step's geometry):
  changing them resizes the caches and compiles again in the background; conversations have
  caches of their own (`CHAT_CONTEXT` positions, keyed by chat id), and the two share the
  `cache.budgetMiB` budget half and half;
- `adapters` are loaded and unloaded on the engine thread, between two steps.

Requests become `engine.Stream`s advanced one unit at a time by the scheduler; their events are
handed to the event loop through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import engine

from ..chat.prompt import encode_chat
from ..scheduler import Priority, Scheduler
from ..settings import CacheSettings, CompletionSettings, Settings, default_cache_budget_mib
from ..tokenizer import PromptTokenizer
from .base import (
    BackendError,
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    End,
    Event,
    StatusListener,
    TextDelta,
    ToolCalls,
)
from .jobs import ChatTokens, StreamJob, TokenDecoder

log = logging.getLogger(__name__)

# Prompt tokens per prefill step: a superseded request stops within one step, and what it
# computed stays in the document's prefix cache for the next keystroke.
PREFILL_CHUNK = 256
# Room in each document's cache for the generated tokens and for edits behind the cursor
# (sliding-window layers): see `engine.PrefixCache`.
REWIND = 512
# The compile thread runs at a lower priority than the engine thread, so that completions served
# meanwhile on the eager path keep most of the cores.
COMPILE_NICENESS = 10


# Positions of a conversation's cache entry (a longer conversation runs without the cache), and
# the room to cut it back by (the previous answer as generated vs as the next turn encodes it).
CHAT_CONTEXT = 8192
CHAT_REWIND = 1024


def context_tokens(settings: CompletionSettings) -> int:
    """Positions a completion can need: the prompt's budgets, FIM's special tokens, the output;
    rounded up so that small settings changes keep the same geometry."""
    needed = settings.prefix_tokens + settings.suffix_tokens + settings.max_tokens + 16
    return -(-needed // 256) * 256


@dataclass(frozen=True)
class _ModelSpec:
    path: str
    device: str
    dtype: str | None
    quantize: str | None = None


def _load(spec: _ModelSpec) -> engine.Model:
    if spec.device.startswith("cuda"):
        import torch  # only to ask: the engine itself is device-agnostic

        if not torch.cuda.is_available():
            raise BackendError(f"device {spec.device!r} is not available (no CUDA GPU or a "
                               "CPU-only torch)")
    gc.unfreeze()  # the previous model's objects, frozen at its load, are collectable again
    model = engine.load(spec.path, device=spec.device, dtype=spec.dtype, quantize=spec.quantize)
    # The model and its tokenizer are ~370k Python objects (a 200M model with a Tekken
    # tokenizer) that live as long as the model: a full collection walked them all, ~200 ms
    # on the engine thread, in whichever keystroke it fell. Frozen, collections skip them.
    gc.collect()
    gc.freeze()
    return model


class LocalBackend:
    """`eager_step` builds the decode step uncompiled (tests: the same code, no compile)."""

    def __init__(self, scheduler: Scheduler, on_status: StatusListener | None = None, *,
                 eager_step: bool = False) -> None:
        self._scheduler = scheduler
        self._on_status = on_status
        self._eager_step = eager_step
        self._status = BackendStatus("idle", "No model configured: set `model` to a Mistral "
                                     "checkpoint folder")
        self._spec: _ModelSpec | None = None
        self._configured = False  # the first configure reports the status, whatever it is
        self._model: engine.Model | None = None
        self._tokenizer: PromptTokenizer | None = None
        self._prefix_cache: engine.PrefixCache | None = None
        self._chat_cache: engine.PrefixCache | None = None
        self._cache_shape: tuple[int, CacheSettings] | None = None
        self._compile = True
        self._image_limits = engine.ImageLimits()
        self._adapters: dict[str, str] = {}
        self._generation = 0  # bumped at every model change: late compiles are dropped
        self._compiling: threading.Thread | None = None
        self._compiling_for: tuple[int, int, tuple[str, ...]] | None = None

    # -- what the server sees -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._model.path.name if self._model is not None else "local"

    @property
    def status(self) -> BackendStatus:
        return self._status

    @property
    def tokenizer(self) -> PromptTokenizer | None:
        return self._tokenizer

    @property
    def model(self) -> engine.Model | None:
        return self._model

    async def configure(self, settings: Settings) -> None:
        spec = _ModelSpec(settings.model, settings.device, settings.dtype, settings.quantize) \
            if settings.model is not None else None
        self._compile = settings.compile
        self._image_limits = engine.ImageLimits(max_bytes=settings.chat.max_image_mib * 2**20)
        switched = spec != self._spec or not self._configured
        self._configured = True
        if switched:
            self._spec = spec
            await self._switch(spec)
        if self._model is None:
            return
        compiling = await self._run(self._size_caches, settings.completion, settings.cache)
        if switched or compiling:
            self._set_status(self._ready_status())
        await self._sync_adapters(dict(settings.adapters))

    async def adopt(self, model: engine.Model, settings: Settings) -> None:
        """Serve `model`, already loaded (an embedding application's, or a test's), with the
        caches and compiled step `settings` ask for; its loaded adapters stay as they are."""
        self._generation += 1
        self._spec = _ModelSpec(str(model.path), str(model.device), None, model.quantize)
        self._compile = settings.compile
        self._model = model
        self._tokenizer = PromptTokenizer(model.tokenizer)
        self._adapters = {name: "" for name in model.loras}
        self._cache_shape = None
        await self._run(self._size_caches, settings.completion, settings.cache)
        self._set_status(self._ready_status())

    def complete(self, request: CompletionRequest) -> AsyncIterator[Event]:
        model = self._require_model()
        sampling = engine.SamplingParams(max_tokens=request.sampling.max_tokens,
                                         temperature=request.sampling.temperature,
                                         top_p=request.sampling.top_p)
        key: object = request.key if request.adapter is None else (request.key, request.adapter)
        prefix_cache = self._prefix_cache

        def make(cancel: engine.CancellationToken) -> engine.Stream:
            return engine.stream(list(request.tokens), model, sampling, cancel=cancel,
                                 chunk_size=PREFILL_CHUNK, prefix_cache=prefix_cache,
                                 cache_key=key, adapter=request.adapter,
                                 lookup=request.lookup)

        return self._events(make, request.stop, request.on_end, Priority.INTERACTIVE,
                            request.key)

    async def chat(self, request: ChatRequest) -> AsyncIterator[Event]:
        model = self._require_model()
        sampling = engine.SamplingParams(max_tokens=request.sampling.max_tokens,
                                         temperature=request.sampling.temperature,
                                         top_p=request.sampling.top_p)
        # Encoded off the event loop and off the engine thread (images take a while).
        limits = self._image_limits if model.has_vision else None
        prompt = await asyncio.get_running_loop().run_in_executor(
            None, encode_chat, model.tokenizer, request.messages, request.tools, limits)
        chat_cache = self._chat_cache

        def make(cancel: engine.CancellationToken) -> engine.Stream:
            return engine.stream(prompt.tokens, model, sampling, cancel=cancel,
                                 chunk_size=PREFILL_CHUNK, prefix_cache=chat_cache,
                                 cache_key=request.key, adapter=request.adapter,
                                 images=prompt.images or None, image_limits=limits or
                                 engine.ImageLimits())

        async for event in self._events(make, None, request.on_end, Priority.BACKGROUND,
                                        request.key, ChatTokens(model.tokenizer)):
            yield event

    def forget(self, key: str) -> None:
        for cache in (self._prefix_cache, self._chat_cache):
            if cache is None:
                continue
            cache.drop(key)
            for name in self._adapters:
                cache.drop((key, name))

    async def close(self) -> None:
        self._generation += 1
        self._model = self._tokenizer = self._prefix_cache = self._chat_cache = None

    # -- running requests -----------------------------------------------------------------------

    async def _events(self, make: Callable[[engine.CancellationToken], engine.Stream],
                      stop: Callable[[str], bool] | None, on_end: Callable[[End], None] | None,
                      priority: Priority, key: str,
                      decoder: TokenDecoder | None = None) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = engine.CancellationToken()
        consumer_gone = False

        def receive(item: object) -> None:
            if isinstance(item, End) and on_end is not None:
                on_end(item)
            if not consumer_gone:
                queue.put_nowait(item)

        def deliver(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is exiting
                loop.call_soon_threadsafe(receive, item)

        job = StreamJob(lambda: make(cancel), deliver, cancel, stop, decoder)
        self._scheduler.submit(job, priority, key)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, engine.EngineError):
                    raise BackendError(str(item)) from None
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, (TextDelta, ToolCalls, End))
                yield item
                if isinstance(item, End):
                    return
        finally:
            consumer_gone = True
            cancel.cancel()  # the engine stops before its next step

    def _require_model(self) -> engine.Model:
        if self._model is None:
            raise BackendError("no model is loaded")
        return self._model

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the engine thread, between two steps of whatever runs there."""
        return await asyncio.wrap_future(self._scheduler.call(lambda: fn(*args)))

    # -- the model's life -------------------------------------------------------------------------

    def _set_status(self, status: BackendStatus) -> None:
        self._status = status
        if self._on_status is not None:
            self._on_status(status)

    async def _switch(self, spec: _ModelSpec | None) -> None:
        self._generation += 1
        self._model = self._tokenizer = self._prefix_cache = self._chat_cache = None
        self._cache_shape = None
        self._adapters = {}
        if spec is None:
            self._set_status(BackendStatus("idle", "No model configured: set `model` to a "
                                           "Mistral checkpoint folder"))
            return
        self._set_status(BackendStatus("loading", f"Loading {spec.path}"))
        generation = self._generation
        try:
            model = await self._run(_load, spec)
        except (engine.EngineError, BackendError, ValueError, OSError, RuntimeError) as e:
            # RuntimeError: torch's own (out of memory, a device it cannot use).
            if generation == self._generation:
                self._set_status(BackendStatus("error", f"could not load the model: {e}"))
            return
        if generation != self._generation:  # the settings named another model meanwhile
            return
        self._model = model
        self._tokenizer = PromptTokenizer(model.tokenizer)
        log.info("model ready: %r", model)

    def _ready_status(self) -> BackendStatus:
        model = self._model
        assert model is not None
        fast = model.decoder is not None
        if fast:
            note = ", fast decode step in use"
        elif self._compiling is not None:
            note = "; compiling the fast decode step (completions run meanwhile)"
        else:
            note = ""
        data: dict[str, object] = {"fastDecode": fast}
        if model.decoder is not None:  # which: the C++ layers, or the torch.compile graph
            data["decodeStep"] = "native" if getattr(model.decoder, "native", None) else "compiled"
        return BackendStatus("ready", f"{model.path.name} ready ({model.dtype}, "
                             f"{model.device}){note}", data)

    def _size_caches(self, completion: CompletionSettings, cache: CacheSettings) -> bool:
        """On the engine thread: prefix caches sized for the prompt budgets (a new size
        replaces them, and the compiled step is built again for it). True if a compile
        started."""
        model = self._model
        if model is None:
            return False
        shape = (context_tokens(completion), cache)
        if shape == self._cache_shape:
            return False
        self._cache_shape = shape
        for old in (self._prefix_cache, self._chat_cache):
            if old is not None:
                old.clear()
        self._prefix_cache = self._chat_cache = None
        if cache.enabled:
            budget = cache.budget_mib if cache.budget_mib is not None \
                else default_cache_budget_mib()
            self._prefix_cache = engine.PrefixCache(
                model, max_seq_len=shape[0], budget_bytes=budget * 2**19, rewind=REWIND)
            context = min(CHAT_CONTEXT, model.config.max_position_embeddings or CHAT_CONTEXT)
            self._chat_cache = engine.PrefixCache(
                model, max_seq_len=context, budget_bytes=budget * 2**19, rewind=CHAT_REWIND)
        decoder = model.decoder
        if decoder is not None and decoder.max_seq_len != shape[0]:
            model.decoder = None
        return self._recompile_if_needed()

    def _start_compile(self, model: engine.Model, max_seq_len: int) -> None:
        """Compile on a thread of its own; `_swap_in` installs the result between two steps.
        A compile already under way for the same size and layers is not started twice."""
        generation = self._generation
        target = (generation, max_seq_len, tuple(model.loras))
        if self._compiling is not None and self._compiling_for == target:
            return
        self._compiling_for = target

        def build() -> None:
            with contextlib.suppress(OSError, AttributeError):  # not Linux: default priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)
            started = time.perf_counter()
            try:
                decoder = engine.compile_decode_step(model, max_seq_len, 1, REWIND,
                                                     compile=not self._eager_step)
            except engine.EngineError as e:  # an architecture it does not support
                log.info("decoding eagerly: %s", e)
                self._compiling = None
                return
            log.info("decode step compiled in %.1f s", time.perf_counter() - started)
            self._scheduler.call(lambda: self._swap_in(generation, model, decoder, target[2]))

        thread = threading.Thread(target=build, name="tramontane-compile", daemon=True)
        self._compiling = thread
        thread.start()

    def _swap_in(self, generation: int, model: engine.Model, decoder: Any,
                 loras: tuple[str, ...]) -> None:
        """On the engine thread, between two steps."""
        self._compiling = None
        if generation != self._generation or model is not self._model:
            return
        if self._cache_shape is None or decoder.max_seq_len != self._cache_shape[0] or \
                tuple(model.loras) != loras:
            # The budgets or the adapters changed while it compiled: compile for them.
            self._recompile_if_needed()
            return
        model.decoder = decoder
        self._set_status(self._ready_status())

    async def _sync_adapters(self, wanted: dict[str, str]) -> None:
        if wanted == self._adapters:
            return
        problems = await self._run(self._load_adapters, wanted)
        self._adapters = dict(wanted)
        # The model set its compiled step aside (the layers changed): build one for them.
        if await self._run(self._recompile_if_needed):
            self._set_status(self._ready_status())
        if problems:
            raise BackendError("; ".join(problems))

    def _recompile_if_needed(self) -> bool:
        """On the engine thread: start a compile if the model has no compiled step for its
        current layers and caches; True if one started."""
        model = self._model
        if model is None or not self._compile or self._cache_shape is None or \
                model.decoder is not None:
            return False
        self._start_compile(model, self._cache_shape[0])
        return True

    def _load_adapters(self, wanted: dict[str, str]) -> list[str]:
        """On the engine thread: exactly `wanted` ({name: path}) loaded; one message per adapter
        that could not be."""
        model = self._model
        if model is None:
            return []
        problems = []
        for name in model.loras:
            if wanted.get(name) != self._adapters.get(name):
                model.unload_lora(name)
                if self._prefix_cache is not None:
                    for key in self._prefix_cache.cached_keys():
                        if isinstance(key, tuple) and key[1] == name:
                            self._prefix_cache.drop(key)
        for name, path in wanted.items():
            if name in model.loras:
                continue
            try:
                model.load_lora(path, name=name)
            except engine.EngineError as e:
                problems.append(f"LoRA adapter {name!r} not loaded: {e}")
        return problems

