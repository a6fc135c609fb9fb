"""The one interface between the server and whatever runs the model, in the server's own terms.

The features build requests (a completion: the FIM windows' text and the token prompt; a chat
turn: messages, images, tool schemas) and read back events (text deltas, tool calls, the end
with its reason and counters). A backend turns them into engine work (`local.py`: the
in-process engine on the engine thread) or into HTTP (remote servers, on the event loop). The
server looks no further: it configures a backend with the settings, reports its status, tells
it when a document or a conversation is gone, and closes it.

Streaming is an async iterator of events per request; closing it (`aclose()`, or cancelling the
task that iterates it) stops the work: the local engine within one step, an HTTP stream at once.
The last event is always an `End`, unless the consumer stopped iterating first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..settings import Settings
from ..tokenizer import PromptTokenizer

EndReason = Literal["stop", "length", "cancelled"]
State = Literal["idle", "loading", "ready", "error"]


class BackendError(Exception):
    """A request or a configuration the backend cannot serve; the message is one line, fit for
    the editor (no traceback, no secret)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class CompletionRequest:
    """Fill in the middle at a cursor of document `key`."""

    key: str  # the document: per-document state (the local engine's prefix cache) is keyed so
    prefix: str  # the text before the cursor, as the prompt windows cut it
    suffix: str  # the text after it
    tokens: tuple[int, ...]  # mistral-common's FIM prompt of prefix and suffix
    sampling: Sampling
    adapter: str | None = None  # a LoRA adapter the backend has loaded; None = the base model
    # Draft tokens checked per decode pass (speculative decoding by lookup; greedy only, the
    # output is the same); 0 = off. The local engine's; remote servers choose their own.
    lookup: int = 0
    # Called with each piece of text where it is produced (the engine thread, or the event loop
    # for remote backends); True ends the generation at once: the completion is known to be
    # finished (post-processing's stop rules).
    stop: Callable[[str], bool] | None = None
    # Called once the backend is done with the request, also after the consumer stopped
    # iterating (a cancelled request): what the request cost.
    on_end: Callable[[End], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: `parameters` is its JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ChatRequest:
    """One model turn of conversation `key`: `messages` in the OpenAI/Mistral chat shape
    (`{"role", "content": str | parts, "tool_calls"?, "tool_call_id"?, "name"?}`, image parts as
    `data:` URIs), the tools the model may call."""

    key: str
    messages: Sequence[dict[str, Any]]
    tools: Sequence[ToolSpec]
    sampling: Sampling
    adapter: str | None = None
    on_end: Callable[[End], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it: validated by the caller


# The name of a call the model wrote but that could not be parsed (its arguments:
# {"problem": "..."}): the turn goes on, and the model reads why as the call's error result.
INVALID_CALL = "invalid_tool_call"


@dataclass(frozen=True)
class ToolCalls:
    """The model asked for these calls (its turn ends with them)."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class End:
    reason: EndReason
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens taken from a cache instead of computed
    computed_tokens: int = 0  # tokens run through the model (prefill and fed back)
    generated_tokens: int = 0
    seconds: float = 0.0
    # For a request cancelled while it ran: how long the backend went on after the cancel.
    stopped_ms: float | None = None
    # Speculative decoding by lookup (the local engine): tokens drafted, and those accepted.
    drafted_tokens: int = 0
    accepted_tokens: int = 0


Event = TextDelta | ToolCalls | End


@dataclass(frozen=True)
class BackendStatus:
    state: State
    message: str
    # Extra fields `tramontane/status` carries (e.g. "fastDecode": true).
    details: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def status(self) -> BackendStatus: ...

    @property
    def tokenizer(self) -> PromptTokenizer | None:
        """The tokenizer prompts are built with; None until the backend is ready."""
        ...

    async def configure(self, settings: Settings) -> None:
        """Bring the backend in line with `settings` (load or swap the model, size caches,
        load adapters, ...). Returns when it can serve, or has failed (its status says so);
        slow work past that point (compiling) goes on in the background."""
        ...

    def complete(self, request: CompletionRequest) -> AsyncIterator[Event]: ...

    def chat(self, request: ChatRequest) -> AsyncIterator[Event]: ...

    def forget(self, key: str) -> None:
        """Drop what the backend keeps for `key` (a document closed, a chat deleted)."""
        ...

    async def close(self) -> None: ...


StatusListener = Callable[[BackendStatus], None]
