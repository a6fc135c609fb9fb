"""One chat turn: the model answers, calls tools, reads their results, until it answers without a
tool call or the step limit is reached.

`ChatService.turn` runs on the event loop for each `tramontane/chat` request:

- the backend streams the answer (`backends/base.py`): text deltas go to the editor as they
  come (`tramontane/chatDelta`, kind "text"); a turn that ends with tool calls gives each call
  to the tool host (validation against the tool's schema, the workspace sandbox, the time limit
  and the output cap are the host's), reporting it before it runs (kind "toolCall") and its
  result after (kind "toolResult"); results go back to the model as tool messages;
- every message this turn added (the expanded user message with its attached context, the
  assistant's messages with their tool calls, the tool results) is in the result, ready to be
  sent back with the next turn: the conversation's prefix then matches what the engine holds in
  the chat's cache, and only the new messages are prefilled;
- cancelling the request (`$/cancelRequest`: pygls cancels this coroutine) closes the backend's
  stream (the engine stops before its next step) and abandons a running tool (its result is
  dropped).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..backends.base import (
    Backend,
    BackendError,
    ChatRequest,
    End,
    Sampling,
    TextDelta,
    ToolCall,
    ToolCalls,
    ToolSpec,
)

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "toolLimit"]
Message = dict[str, Any]


@dataclass(frozen=True)
class ToolOutcome:
    content: str
    is_error: bool = False


class ToolHost(Protocol):
    """The tools one turn may call, and how they run."""

    @property
    def specs(self) -> Sequence[ToolSpec]: ...

    async def run(self, call: ToolCall) -> ToolOutcome:
        """Validate and run `call`; every failure is an error outcome the model reads."""
        ...


@dataclass
class Usage:
    prompt_tokens: int = 0  # of the last model step: the whole conversation so far
    reused_tokens: int = 0  # summed over the model steps: taken from the chat's cache
    generated_tokens: int = 0  # summed over the model steps


@dataclass
class TurnResult:
    message: Message  # the last assistant message
    messages: list[Message]  # everything this turn added, in order
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)


Deltas = Callable[[dict[str, Any]], None]


class ChatService:
    def __init__(self, backend: Callable[[], Backend | None]) -> None:
        self._backend = backend

    def forget(self, chat_id: str) -> None:
        """The conversation was deleted: its cache goes."""
        backend = self._backend()
        if backend is not None:
            backend.forget(chat_id)

    async def turn(self, chat_id: str, messages: Sequence[Message], added: list[Message],
                   host: ToolHost, sampling: Sampling, max_tool_steps: int,
                   deltas: Deltas) -> TurnResult:
        """Answer the conversation `messages` + `added` (`added`: what this turn already added,
        such as the user message with its context; the turn appends to it)."""
        backend = self._backend()
        if backend is None:
            raise BackendError("no model is configured")
        usage = Usage()
        steps = 0
        while True:
            request = ChatRequest(key=chat_id, messages=[*messages, *added], tools=host.specs,
                                  sampling=sampling)
            text: list[str] = []
            calls: tuple[ToolCall, ...] = ()
            end: End | None = None
            events = backend.chat(request)
            # Closed here whatever ends the loop (a remote backend's HTTP stream with it), not
            # whenever the garbage collector gets to it.
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                        deltas({"kind": "text", "text": event.text})
                    elif isinstance(event, ToolCalls):
                        calls = event.calls
                    elif isinstance(event, End):
                        end = event
            if end is not None:
                usage.prompt_tokens = end.prompt_tokens
                usage.reused_tokens += end.reused_tokens
                usage.generated_tokens += end.generated_tokens
            answer: Message = {"role": "assistant", "content": "".join(text)}
            if calls:
                answer["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            added.append(answer)
            if not calls:
                reason: FinishReason = "length" if end is not None and \
                    end.reason == "length" else "stop"
                return TurnResult(answer, added, reason, usage)
            if steps >= max_tool_steps:
                return TurnResult(answer, added, "toolLimit", usage)
            steps += 1
            for call in calls:
                deltas({"kind": "toolCall", "toolCall": {"id": call.id, "name": call.name,
                                                         "arguments": call.arguments}})
                outcome = await host.run(call)
                deltas({"kind": "toolResult", "toolResult": {
                    "id": call.id, "content": outcome.content, "isError": outcome.is_error}})
                added.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                              "content": outcome.content})
