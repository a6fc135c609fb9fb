"""What the engine thread runs for a local backend's request: an `engine.Stream` advanced one
unit of work per scheduler step (`StreamJob`), its tokens turned into the seam's events where
they are produced (`PlainText` for completions, `ChatTokens` for chat answers and their tool
calls), and handed to the event loop through `deliver`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine

from ..chat.errors import ToolCallError
from ..chat.toolcalls import ToolCallDecoder, new_call_id
from .base import INVALID_CALL, End, Event, TextDelta, ToolCall, ToolCalls


class TokenDecoder(Protocol):
    """What a stream's tokens say: visible text as it comes, then whatever the end reveals
    (a chat's tool calls)."""

    def feed(self, event: engine.TokenEvent) -> str: ...

    def finish(self, rest: str) -> tuple[str, list[Event]]: ...


class PlainText:
    """Completions: the engine's UTF-8-safe text deltas as they are."""

    def feed(self, event: engine.TokenEvent) -> str:
        return event.text

    def finish(self, rest: str) -> tuple[str, list[Event]]:
        return rest, []


class ChatTokens:
    """Chat answers: visible text until the model's `[TOOL_CALLS]` token, then its tool calls
    (`chat.toolcalls` parses every tokenizer version's format, in bounded time and memory). A
    call that cannot be parsed becomes an `INVALID_CALL` whose error the model reads."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self._decoder = ToolCallDecoder(tokenizer)

    def feed(self, event: engine.TokenEvent) -> str:
        return self._decoder.feed(event.token)

    def finish(self, rest: str) -> tuple[str, list[Event]]:
        text = self._decoder.flush()  # the decoder decodes the tokens itself: `rest` is ours
        calls = self._decoder.finish()
        if isinstance(calls, ToolCallError):
            invalid = ToolCall(new_call_id(), INVALID_CALL, json.dumps({"problem": str(calls)}))
            return text, [ToolCalls((invalid,))]
        return text, [ToolCalls(tuple(calls))] if calls else []


class StreamJob:
    """An `engine.Stream` run by the scheduler; its events go to `deliver` (thread-safe)."""

    def __init__(self, make: Callable[[], engine.Stream], deliver: Callable[[object], None],
                 cancel: engine.CancellationToken, stop: Callable[[str], bool] | None = None,
                 decoder: TokenDecoder | None = None) -> None:
        self._make = make
        self._deliver = deliver
        self._cancel = cancel
        self._stop = stop
        self._decoder: TokenDecoder = decoder or PlainText()
        self._stream: engine.Stream | None = None
        self._started = time.perf_counter()

    def step(self) -> bool:
        if self._stream is None:
            if self._cancel.cancelled:  # superseded or cancelled before it started
                self._finish(End("cancelled", stopped_ms=self._stopped_ms()))
                return True
            self._stream = self._make()
        stream = self._stream
        for event in stream.step():
            if isinstance(event, engine.EndEvent):
                rest, extra = self._decoder.finish(event.text)
                if rest:  # the bytes left at the end, flushed
                    self._deliver(TextDelta(rest))
                    if self._stop is not None:
                        self._stop(rest)
                for item in extra:
                    self._deliver(item)
                self._finish(self._end(event))
                return True
            text = self._decoder.feed(event)
            if text:
                self._deliver(TextDelta(text))
                if self._stop is not None and self._stop(text):
                    self._finish(self._end(stream.stop()))
                    return True
        return stream.finished

    def close(self, error: BaseException | None = None) -> None:
        if self._stream is not None:
            self._stream.close()
        self._deliver(error if error is not None else
                      End("cancelled", stopped_ms=self._stopped_ms()))

    def _stopped_ms(self) -> float | None:
        at = self._cancel.cancelled_at
        return None if at is None else (time.monotonic() - at) * 1000

    def _end(self, event: engine.EndEvent) -> End:
        return End(event.reason, event.prompt_tokens, event.cached_tokens,
                   event.computed_tokens, event.generated_tokens,
                   time.perf_counter() - self._started,
                   self._stopped_ms() if event.reason == "cancelled" else None,
                   event.drafted_tokens, event.accepted_tokens)

    def _finish(self, end: End) -> None:
        self._deliver(end)
