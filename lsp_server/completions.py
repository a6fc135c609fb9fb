"""One completion, from a document position to the text to show; and who runs when.

`CompletionService.complete` is called by the LSP handlers on the event loop. It:

- cancels the request still running for the same document (Neovim never cancels superseded
  requests; VS Code does, but a new keystroke may arrive first), so at most one completion per
  document computes and stale ones stop within one decode step;
- waits the debounce delay, if any, and gives up if superseded meanwhile;
- runs the blocking part (`run_completion`: prompt, generation, post-processing) on the single
  engine thread, never on the event loop;
- turns an LSP `$/cancelRequest` (pygls cancels the handler's task) into a cancelled token, so
  the engine thread stops too instead of computing for nobody;
- answers from the completion last shown when the user typed its beginning (typing through
  the ghost text), without running the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import engine

from .backend import Backend, GenerationRequest
from .documents import Document
from .postprocess import CompletionContext, CompletionFilter, detect_indentation
from .prompt import PromptBuilder, PromptCancelled
from .settings import CompletionSettings

log = logging.getLogger(__name__)

# Why a completion came back empty, as `tramontane/status` reports it.
NO_MODEL = "no model"
CANCELLED = "cancelled"
BUDGET = "budget exhausted"
NOTHING = "nothing useful"
DISABLED = "disabled for this language"
ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    text: str
    reason: str | None = None  # set when `text` is empty
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    reused_tokens: int = 0  # prompt tokens taken from the document's prefix cache
    computed_tokens: int = 0  # tokens run through the model (prefill + fed back)
    typed_through: bool = False  # answered from the completion shown before, no model run
    # For a cancelled request: how long the engine ran on after the cancel, in ms.
    stopped_ms: float | None = None

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens


@dataclass(frozen=True)
class _Shown:
    """A completion the editor got: the document and cursor it was for, and its text."""

    document: Document
    cursor: int
    text: str

    def typed_through(self, document: Document, cursor: int) -> str | None:
        """What is left of the completion if the user has typed its beginning, else None."""
        old, new = self.document.text, document.text
        typed_len = cursor - self.cursor
        if typed_len < 0 or len(new) - len(old) != typed_len or typed_len >= len(self.text):
            return None
        typed = new[self.cursor:cursor]
        if not self.text.startswith(typed) or new[:self.cursor] != old[:self.cursor] or \
                new[cursor:] != old[self.cursor:]:
            return None
        return self.text[typed_len:]


def run_completion(backend: Backend, document: Document, cursor: int,
                   settings: CompletionSettings, cancel: engine.CancellationToken) -> Outcome:
    """Blocking: prompt -> generation -> post-processing. Runs on the engine thread."""
    start = time.perf_counter()
    if cancel.cancelled:
        return Outcome("", CANCELLED)
    raw = backend.tokenizer.instruct_tokenizer.tokenizer
    builder = PromptBuilder(lambda text: len(raw.encode(text, bos=False, eos=False)),
                            prefix_tokens=settings.prefix_tokens,
                            suffix_tokens=settings.suffix_tokens)
    try:
        prompt = builder.build(document, cursor, lambda: cancel.cancelled)
    except PromptCancelled:
        return Outcome("", CANCELLED, stopped_ms=_stopped_ms(cancel))
    tokens = engine.encode_fim(backend.tokenizer, prompt.prefix, prompt.suffix)
    context = CompletionContext.from_prefix_suffix(
        prompt.prefix, prompt.suffix, indentation=detect_indentation(prompt.prefix + prompt.suffix))
    text_filter = CompletionFilter(context)
    sampling = engine.SamplingParams(max_tokens=settings.max_tokens,
                                     temperature=settings.temperature)
    deadline = start + settings.time_budget_ms / 1000
    events = backend.stream(GenerationRequest(tokens, sampling, document.uri,
                                              settings.adapter), cancel)
    generated, reason, reused, computed = 0, None, 0, 0
    try:
        for event in events:
            if isinstance(event, engine.EndEvent):
                reused, computed = event.cached_tokens, event.computed_tokens
                text_filter.feed(event.text)
                reason = CANCELLED if event.reason == "cancelled" else None
                break
            generated += 1
            if text_filter.feed(event.text):
                break  # the completion is known to be finished: stop generating now
            if time.perf_counter() > deadline:
                reason = BUDGET
                break
    finally:
        events.close()  # stops the engine at once if we left the loop early
    text = text_filter.finalize() if reason != CANCELLED else ""
    seconds = time.perf_counter() - start
    if not text and reason is None:
        reason = NOTHING
    return Outcome(text, reason if not text else None, len(tokens), generated, seconds,
                   reused, computed, stopped_ms=_stopped_ms(cancel))


def _stopped_ms(cancel: engine.CancellationToken) -> float | None:
    if cancel.cancelled_at is None:
        return None
    return (time.monotonic() - cancel.cancelled_at) * 1000


class CompletionService:
    """`on_finished(uri, outcome)` is called on the event loop for every request that ran the
    model, when the engine thread is done with it: also for a request whose caller was
    cancelled and got its reply long before."""

    def __init__(self, executor: Executor, backend: Callable[[], Backend | None],
                 on_finished: Callable[[str, Outcome], None] | None = None) -> None:
        self._executor = executor
        self._backend = backend
        self._on_finished = on_finished
        self._running: dict[str, engine.CancellationToken] = {}
        self._shown: dict[str, _Shown] = {}

    def cancel_all(self) -> None:
        for token in self._running.values():
            token.cancel()

    def cancel(self, uri: str) -> None:
        if (token := self._running.get(uri)) is not None:
            token.cancel()

    def forget(self, uri: str) -> None:
        """The document was closed."""
        self.cancel(uri)
        self._shown.pop(uri, None)

    def forget_shown(self) -> None:
        """The settings changed: completions shown so far may not be what they would give."""
        self._shown.clear()

    async def complete(self, document: Document, cursor: int,
                       settings: CompletionSettings) -> Outcome:
        if not settings.enabled_for(document.language_id):
            return Outcome("", DISABLED)
        backend = self._backend()
        if backend is None:
            return Outcome("", NO_MODEL)
        uri = document.uri
        if (previous := self._running.get(uri)) is not None:
            previous.cancel()
        shown = self._shown.get(uri)
        if shown is not None and (rest := shown.typed_through(document, cursor)) is not None:
            return Outcome(rest, typed_through=True)
        token = engine.CancellationToken()
        self._running[uri] = token
        try:
            if settings.debounce_ms:
                await asyncio.sleep(settings.debounce_ms / 1000)
                if token.cancelled:
                    return Outcome("", CANCELLED)
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._executor, run_completion, backend, document, cursor, settings, token)
            future.add_done_callback(lambda f: self._finished(uri, f))
            # Shielded: cancelling this request must not cancel the future (the engine thread
            # cannot be interrupted; `token` stops it), so its outcome is still reported.
            outcome = await asyncio.shield(future)
            if outcome.text:
                self._shown[uri] = _Shown(document, cursor, outcome.text)
            return outcome
        except asyncio.CancelledError:
            token.cancel()  # $/cancelRequest: stop the engine thread too
            raise
        finally:
            if self._running.get(uri) is token:
                del self._running[uri]

    def _finished(self, uri: str, future: asyncio.Future[Outcome]) -> None:
        if self._on_finished is None or future.cancelled() or future.exception() is not None:
            return
        self._on_finished(uri, future.result())
