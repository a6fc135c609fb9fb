"""The OpenAI-compatible wire format as vLLM serves it: pure functions, no I/O.

- FIM goes to `/v1/completions` as token ids: vLLM refuses `suffix` for Mistral models ("suffix
  is only supported for models with FIM completion rendering"), so the prompt is mistral-common's
  `[BOS] [SUFFIX] suffix [PREFIX] prefix`, built by the caller (`engine.encode_fim`). The
  chunks carry `choices[0].text`; `stream_options.include_usage` adds a last chunk with the
  counters and no choice.
- Chat goes to `/v1/chat/completions` with `tools` and `stream: true`; images as `image_url`
  objects holding a `data:` URI. Chunks carry `choices[0].delta` (see `wire.DeltaStream`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .http import RemoteError
from .wire import (
    DeltaStream,
    Finish,
    Message,
    Sampling,
    TextDelta,
    Tool,
    Usage,
    choice_of,
    error_of,
    malformed,
    sampling_json,
    token_ids_of,
    tool_call_json,
    tool_json,
    usage_of,
)

COMPLETIONS_PATH = "completions"
CHAT_PATH = "chat/completions"


def completion_request(model: str, prompt: Sequence[int], sampling: Sampling, *,
                       return_token_ids: bool = False) -> dict[str, Any]:
    """`return_token_ids` is vLLM's extension: each chunk then carries its token ids."""
    body: dict[str, Any] = {"model": model, "prompt": list(prompt), "stream": True,
                            "stream_options": {"include_usage": True}, **sampling_json(sampling)}
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if return_token_ids:
        body["return_token_ids"] = True
    return body


def chat_request(model: str, messages: Sequence[Message], sampling: Sampling,
                 tools: Sequence[Tool] = (), *,
                 tool_choice: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`tool_choice`: "auto", "none", "required", or `{"type": "function", "function": {"name":
    ...}}` to force one tool; None leaves the server's default ("auto" when tools are given)."""
    body: dict[str, Any] = {"model": model, "messages": [message_json(m) for m in messages],
                            "stream": True, "stream_options": {"include_usage": True},
                            **sampling_json(sampling)}
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if tools:
        body["tools"] = [tool_json(t) for t in tools]
    if tool_choice is not None:
        body["tool_choice"] = tool_choice if isinstance(tool_choice, str) else dict(tool_choice)
    return body


def message_json(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = {"role": message.role}
    if message.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.text}] \
            if message.text else []
        parts += [{"type": "image_url", "image_url": {"url": image.data_uri()}}
                  for image in message.images]
        body["content"] = parts
    else:
        body["content"] = message.text if message.text or not message.tool_calls else None
    if message.tool_calls:
        body["tool_calls"] = [tool_call_json(c) for c in message.tool_calls]
    if message.tool_call_id is not None:
        body["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        body["name"] = message.name
    return body


class CompletionStream:
    """`/v1/completions` chunks in, `TextDelta`s out; `finish()` after [DONE]."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[TextDelta]:
        error = error_of(chunk, self.label)
        if error is not None:
            raise error
        self.usage = usage_of(chunk, self.label) or self.usage
        choice = choice_of(chunk, self.label)
        if choice is None:
            return []
        text = choice.get("text")
        if not isinstance(text, str):
            raise malformed(self.label, "a completion choice without text")
        ids = token_ids_of(choice, self.label)
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise malformed(self.label, "finish_reason is not a string")
            self.reason = reason
        return [TextDelta(text, ids)] if text or ids else []

    def finish(self) -> Finish:
        if self.reason is None:
            raise RemoteError(f"{self.label}: the stream ended without a finish reason")
        return Finish(self.reason, self.usage)


ChatStream = DeltaStream
