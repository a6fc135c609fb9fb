"""One completion, from a document position to the text to show.

`CompletionService.complete` runs on the event loop for each completion request. It:

- cancels the request still running for the same document (Neovim never cancels superseded
  requests; VS Code does, but a new keystroke may arrive first), so at most one completion per
  document computes and stale ones stop within one engine step;
- answers from the completion last shown when the user typed its beginning (typing through the
  ghost text), without running the model;
- waits the debounce delay, if any, and gives up if superseded meanwhile;
- builds the prompt windows on a worker thread (never on the event loop: a 50 MB minified line
  must not stall the other messages), then streams the backend's text through the
  post-processing filter, which the backend calls where the text is produced so that generation
  stops the moment the completion is known to be finished;
- turns an LSP `$/cancelRequest` (pygls cancels the handler's task) into closing the backend's
  stream, which stops the engine before its next step, and answers with what it has when the
  time budget runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .backends.base import Backend, CompletionRequest, End, Sampling, TextDelta
from .documents import Document
from .postprocess import CompletionContext, CompletionFilter, detect_indentation
from .prompt import PromptBuilder, PromptCancelled
from .settings import CompletionSettings
from .tokenizer import PromptTokenizer, prompt_text

log = logging.getLogger(__name__)

# Why a completion came back empty, as `tramontane/status` reports it.
NO_MODEL = "no model"
LOADING = "loading"
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
    drafted_tokens: int = 0  # speculative decoding by lookup: tokens drafted, and accepted
    accepted_tokens: int = 0
    # Answered at the time budget: how late the event loop ran the budget's timer, in ms (a
    # starved machine; or code that held the loop up).
    budget_late_ms: float | None = None

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @classmethod
    def of(cls, end: End, text: str = "", reason: str | None = None) -> Outcome:
        return cls(text, reason, end.prompt_tokens, end.generated_tokens, end.seconds,
                   end.reused_tokens, end.computed_tokens, stopped_ms=end.stopped_ms,
                   drafted_tokens=end.drafted_tokens, accepted_tokens=end.accepted_tokens)


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


class _SharedFilter:
    """The post-processing filter, fed by the backend (on the engine thread for the local one)
    and finished by the request on the event loop: a lock keeps the two apart, and once
    finished, further text is refused (the backend stops)."""

    def __init__(self, context: CompletionContext) -> None:
        self._filter = CompletionFilter(context)
        self._lock = threading.Lock()
        self._closed = False

    def feed(self, text: str) -> bool:
        with self._lock:
            return self._closed or self._filter.feed(text)

    def finish(self) -> str:
        with self._lock:
            self._closed = True
            return self._filter.finalize()


@dataclass(frozen=True)
class _Prompt:
    prefix: str
    suffix: str
    tokens: tuple[int, ...]


def build_prompt(tokenizer: PromptTokenizer, document: Document, cursor: int,
                 settings: CompletionSettings, cancelled: Callable[[], bool]) -> _Prompt:
    """Blocking (a worker thread): the FIM windows and their token prompt."""
    builder = PromptBuilder(tokenizer.count, prefix_tokens=settings.prefix_tokens,
                            suffix_tokens=settings.suffix_tokens)
    windows = builder.build(document, cursor, cancelled)
    tokens = tokenizer.encode_fim(windows.prefix, windows.suffix)
    return _Prompt(windows.prefix, windows.suffix, tuple(tokens))


class CompletionService:
    """`on_finished(uri, outcome)` is called on the event loop for every request that ran the
    model, when the backend is done with it: also for a request whose caller was cancelled and
    got its reply long before."""

    def __init__(self, backend: Callable[[], Backend | None],
                 on_finished: Callable[[str, Outcome], None] | None = None) -> None:
        self._backend = backend
        self._on_finished = on_finished
        self._running: dict[str, asyncio.Event] = {}
        self._shown: dict[str, _Shown] = {}

    def cancel_all(self) -> None:
        for cancel in self._running.values():
            cancel.set()

    def cancel(self, uri: str) -> None:
        if (cancel := self._running.get(uri)) is not None:
            cancel.set()

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
        tokenizer = backend.tokenizer
        if tokenizer is None:
            return Outcome("", LOADING if backend.status.state == "loading" else NO_MODEL)
        uri = document.uri
        if (previous := self._running.get(uri)) is not None:
            previous.set()
        shown = self._shown.get(uri)
        if shown is not None and (rest := shown.typed_through(document, cursor)) is not None:
            return Outcome(rest, typed_through=True)
        cancel = asyncio.Event()
        self._running[uri] = cancel
        try:
            if settings.debounce_ms:
                await asyncio.sleep(settings.debounce_ms / 1000)
            if cancel.is_set():
                return Outcome("", CANCELLED)
            outcome = await self._run(backend, tokenizer, document, cursor, settings, cancel)
            if outcome.text:
                self._shown[uri] = _Shown(document, cursor, outcome.text)
            return outcome
        finally:
            if self._running.get(uri) is cancel:
                del self._running[uri]

    async def _run(self, backend: Backend, tokenizer: PromptTokenizer, document: Document,
                   cursor: int, settings: CompletionSettings,
                   cancel: asyncio.Event) -> Outcome:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            prompt = await loop.run_in_executor(None, build_prompt, tokenizer, document, cursor,
                                                settings, cancel.is_set)
        except PromptCancelled:
            return Outcome("", CANCELLED)
        windows_text = prompt_text(prompt.prefix + prompt.suffix)
        context = CompletionContext.from_prefix_suffix(
            prompt_text(prompt.prefix), prompt_text(prompt.suffix),
            indentation=detect_indentation(windows_text))
        text_filter = _SharedFilter(context)
        uri = document.uri

        def on_end(end: End) -> None:
            if self._on_finished is not None:
                self._on_finished(uri, Outcome.of(end))

        request = CompletionRequest(
            key=uri, prefix=prompt.prefix, suffix=prompt.suffix, tokens=prompt.tokens,
            sampling=Sampling(settings.max_tokens, settings.temperature),
            adapter=settings.adapter, lookup=settings.lookup, stop=text_filter.feed,
            on_end=on_end)
        events = backend.complete(request)

        async def consume() -> End | None:
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, End):
                        return event
                    assert isinstance(event, TextDelta)  # the filter has it already
            return None

        reading = asyncio.ensure_future(consume())
        waiter = asyncio.ensure_future(cancel.wait())
        end: End | None = None
        reason: str | None = None
        late_ms: float | None = None
        try:
            done, _ = await asyncio.wait(
                {reading, waiter}, timeout=max(0.0, start + settings.time_budget_ms / 1000 -
                                              time.perf_counter()),
                return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                end = reading.result()
                if end is not None and end.reason == "cancelled":
                    reason = CANCELLED
            else:
                reason = CANCELLED if waiter in done else BUDGET
                if reason == BUDGET:
                    late_ms = max(0.0, (time.perf_counter() - start) * 1000 -
                                  settings.time_budget_ms)
        finally:
            waiter.cancel()
            if not reading.done():
                # Closing the backend's stream stops the engine before its next step.
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        text = text_filter.finish() if reason != CANCELLED else ""
        if not text and reason is None:
            reason = NOTHING
        if end is not None:
            outcome = Outcome.of(end, text, reason if not text else None)
        else:
            outcome = Outcome(text, reason if not text else None, len(prompt.tokens),
                              seconds=time.perf_counter() - start)
        if late_ms is not None:
            outcome = replace(outcome, budget_late_ms=late_ms)
        return outcome
