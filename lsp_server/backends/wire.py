"""What the remote wire formats take and give, shared by openai_wire.py and mistral_wire.py.

Inputs (`Message`, `Image`, `Tool`, `Sampling`) are the few facts a request needs, in plain
types; outputs (`TextDelta`, `ToolCall`, `Finish`) are what a stream yields. The server's own
request and event types map onto these one to one.

`ToolCallAssembler` collects streamed tool-call fragments. OpenAI-style servers (vLLM) send a
call in pieces keyed by `index`: the first with `id` and `function.name`, then argument
fragments; Mistral's API sends each call whole in one delta, `index` optional (0 by default),
`arguments` as a string or already as an object. One rule covers both: a fragment that names a
function starts a new call unless the call at its index has no name yet, and a fragment without a
name extends the latest call at its index.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .http import RemoteError

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Image:
    """An image as its encoded bytes (PNG, JPEG, ...); sent as a `data:` URI."""

    data: bytes
    mime_type: str = "image/png"

    def data_uri(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class ToolCall:
    """One complete call. `arguments` is the JSON text as the model wrote it: validating it
    against the tool's schema is the server's job, as for local tool calls."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: Role
    text: str = ""
    images: tuple[Image, ...] = ()  # user turns
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns that called tools
    tool_call_id: str | None = None  # tool results: the call they answer
    name: str | None = None  # tool results: the tool's name


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON schema


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str
    # The generated token ids of this delta, when the server sends them (vLLM with
    # `return_token_ids`); empty otherwise.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens the server took from its prefix cache, when it says so (vLLM with
    # `--enable-prompt-tokens-details`: `usage.prompt_tokens_details.cached_tokens`).
    cached_tokens: int = 0


@dataclass(frozen=True)
class Finish:
    """The end of a stream. `reason` as the server said it: "stop", "length", "tool_calls",
    "abort", ...; `usage` when the server reported it."""

    reason: str
    usage: Usage | None = None


Event = TextDelta | ToolCall


def tool_json(tool: Tool) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": dict(tool.parameters)}}


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def sampling_json(sampling: Sampling) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": sampling.max_tokens,
                            "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return body


def usage_of(chunk: Mapping[str, Any], label: str) -> Usage | None:
    usage = chunk.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise malformed(label, "usage is not an object")
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    if not (_is_count(prompt) and _is_count(completion)):
        raise malformed(label, f"usage counts are not integers: {json.dumps(usage)[:80]}")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, cached if isinstance(cached, int) and _is_count(cached)
                 else 0)


def error_of(chunk: Mapping[str, Any], label: str) -> RemoteError | None:
    """A server's in-stream error: vLLM's `{"error": {"message"}}`, or `{"object": "error"}`."""
    error = chunk.get("error")
    if error is None and chunk.get("object") == "error":
        error = chunk
    if error is None:
        return None
    message = error.get("message") if isinstance(error, dict) else error
    text = " ".join(str(message).split())[:160] if message else "unspecified error"
    return RemoteError(f"{label}: the server reported an error mid-stream: {text}")


def malformed(label: str, why: str) -> RemoteError:
    return RemoteError(f"{label}: malformed event ({why})")


def choice_of(chunk: Mapping[str, Any], label: str) -> Mapping[str, Any] | None:
    """The first choice of a chunk (we always ask for one), None for a usage-only chunk."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise malformed(label, "no choices list")
    if not choices:
        return None
    choice = choices[0]
    if not isinstance(choice, dict):
        raise malformed(label, "a choice is not an object")
    return choice


def token_ids_of(choice: Mapping[str, Any], label: str) -> tuple[int, ...]:
    ids = choice.get("token_ids")
    if ids is None:
        return ()
    if not (isinstance(ids, list) and all(_is_count(i) for i in ids)):
        raise malformed(label, "token_ids is not a list of token ids")
    return tuple(ids)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class _Partial:
    index: int
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Tool-call fragments in, complete `ToolCall`s out (in the order they began)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._calls: list[_Partial] = []

    def feed(self, fragments: object) -> None:
        if fragments is None:
            return
        if not isinstance(fragments, list):
            raise malformed(self.label, "tool_calls is not a list")
        for fragment in fragments:
            self._feed_one(fragment)

    def _feed_one(self, fragment: object) -> None:
        if not isinstance(fragment, dict):
            raise malformed(self.label, "a tool call is not an object")
        index = fragment.get("index", 0)
        function = fragment.get("function") or {}
        if not _is_count(index) or not isinstance(function, dict):
            raise malformed(self.label, f"bad tool call fragment {json.dumps(fragment)[:80]}")
        name, arguments = function.get("name"), function.get("arguments")
        call_id = fragment.get("id")
        latest = next((c for c in reversed(self._calls) if c.index == index), None)
        if latest is None or (name and latest.name):
            latest = _Partial(index)
            self._calls.append(latest)
        if isinstance(call_id, str) and call_id and call_id != "null":
            latest.id = call_id
        if isinstance(name, str) and name:
            latest.name = name
        if isinstance(arguments, (dict, list)):
            latest.arguments.append(json.dumps(arguments))
        elif isinstance(arguments, str):
            latest.arguments.append(arguments)
        elif arguments is not None:
            raise malformed(self.label, "tool call arguments are neither text nor an object")

    def finish(self) -> list[ToolCall]:
        """The calls so far, complete; a call without a name is a malformed stream."""
        calls = []
        for n, partial in enumerate(self._calls):
            if not partial.name:
                raise malformed(self.label, f"tool call {n} has no function name")
            calls.append(ToolCall(partial.id, partial.name, "".join(partial.arguments)))
        self._calls = []
        return calls


class DeltaStream:
    """Chunks of the `delta` shape (OpenAI-style chat, vLLM's chat, Mistral's chat and FIM) in,
    text deltas and complete tool calls out; `finish()` after [DONE].

    A choice's `delta.content` is text, or (Mistral) a list of chunks of which the `text` ones
    are shown and the `thinking` ones skipped. Tool calls are given out whole, when the choice's
    `finish_reason` arrives (or at `finish()` for a server that never sends one with them).
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.tools = ToolCallAssembler(label)
        self.reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        error = error_of(chunk, self.label)
        if error is not None:
            raise error
        self.usage = usage_of(chunk, self.label) or self.usage
        choice = choice_of(chunk, self.label)
        if choice is None:
            return []
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise malformed(self.label, "delta is not an object")
        events: list[Event] = []
        text = content_text(delta.get("content"), self.label)
        ids = token_ids_of(choice, self.label)
        if text or ids:
            events.append(TextDelta(text, tuple(ids)))
        self.tools.feed(delta.get("tool_calls"))
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise malformed(self.label, "finish_reason is not a string")
            self.reason = reason
            events.extend(self.tools.finish())
        return events

    def finish(self) -> tuple[list[ToolCall], Finish]:
        """Tool calls still pending, and the end; a stream that never gave a finish reason
        was cut short."""
        if self.reason is None:
            raise RemoteError(f"{self.label}: the stream ended without a finish reason")
        return self.tools.finish(), Finish(self.reason, self.usage)


def content_text(content: object, label: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise malformed(label, "content is neither text nor a list of chunks")
    parts = []
    for chunk in content:
        if not isinstance(chunk, dict):
            raise malformed(label, "a content chunk is not an object")
        if chunk.get("type") == "text":
            text = chunk.get("text")
            if not isinstance(text, str):
                raise malformed(label, "a text chunk without text")
            parts.append(text)
    return "".join(parts)
