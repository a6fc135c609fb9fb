"""Mistral's API wire format (api.mistral.ai/v1): pure functions, no I/O.

- FIM: `/v1/fim/completions` takes the text itself, `prompt` (before the cursor) and `suffix`
  (after it); the server builds the FIM prompt. Its chunks have the chat shape:
  `choices[0].delta.content`, `finish_reason`, and `usage` on the last chunk.
- Chat: `/v1/chat/completions` with `tools`; an image is `{"type": "image_url", "image_url":
  "data:..."}` (the URI as a plain string). Streamed tool calls arrive whole, `index` optional
  and `arguments` text or an object; `content` may be a list of chunks (text, thinking).
- The seed is `random_seed`; there is no `stream_options` (usage always comes last).
- Tool-call ids must be 9 characters [a-zA-Z0-9]: ids the API gave are sent back unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .wire import DeltaStream, Message, Sampling, Tool, sampling_json, tool_call_json, tool_json

FIM_PATH = "fim/completions"
CHAT_PATH = "chat/completions"


def fim_request(model: str, prefix: str, suffix: str, sampling: Sampling) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prefix, "suffix": suffix, "stream": True,
                            **sampling_json(sampling)}
    if sampling.seed is not None:
        body["random_seed"] = sampling.seed
    return body


def chat_request(model: str, messages: Sequence[Message], sampling: Sampling,
                 tools: Sequence[Tool] = (), *, tool_choice: str | None = None
                 ) -> dict[str, Any]:
    """`tool_choice`: "auto", "none", "any" or "required"; None leaves the API's default."""
    body: dict[str, Any] = {"model": model, "messages": [message_json(m) for m in messages],
                            "stream": True, **sampling_json(sampling)}
    if sampling.seed is not None:
        body["random_seed"] = sampling.seed
    if tools:
        body["tools"] = [tool_json(t) for t in tools]
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    return body


def message_json(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = {"role": message.role}
    if message.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.text}] \
            if message.text else []
        parts += [{"type": "image_url", "image_url": image.data_uri()} for image in message.images]
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


# FIM and chat stream in the same chunk shape.
FimStream = DeltaStream
ChatStream = DeltaStream
