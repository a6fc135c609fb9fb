"""A conversation in the OpenAI/Mistral chat shape -> mistral-common's request -> token ids (and
the images, in the order of their image tokens). Never a hand-written template: the model's own
tokenizer encodes messages, tool schemas and images the way the model was trained.

Images arrive as `data:` URIs; they are decoded here with the engine's limits (encoded size,
pixels checked from the header before decoding, formats, images per message and per
conversation) before mistral-common sees them, so it never fetches or decodes anything itself.
An image URL that is not a `data:` URI is refused: no tool and no prompt fetches a URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, ImageURLChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import ValidationError

import engine

from ..backends.base import BackendError, ToolSpec


@dataclass(frozen=True)
class ChatPrompt:
    tokens: list[int]
    images: list[Any]  # PIL images, in the order of their image tokens


def image_urls(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Every image URL of the conversation, in order."""
    urls = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                urls.append(url.get("url") if isinstance(url, dict) else url)
    return [u if isinstance(u, str) else "" for u in urls]


def _openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def _meaningful(message: dict[str, Any]) -> bool:
    """An assistant message with neither text nor tool calls (the model stopped at once) says
    nothing, and mistral-common refuses it: it is left out of the prompt."""
    return not (message.get("role") == "assistant" and not message.get("content")
                and not message.get("tool_calls"))


def image_counts(messages: Sequence[dict[str, Any]]) -> list[int]:
    return [len(image_urls([m])) for m in messages]


def encode_chat(tokenizer: MistralTokenizer, messages: Sequence[dict[str, Any]],
                tools: Sequence[ToolSpec], images: engine.ImageLimits | None) -> ChatPrompt:
    """The prompt of `messages` with `tools`; `images`: the limits pasted images must keep, or
    None when the model takes no images (an image then is an error saying so)."""
    if tools and not can_encode_tools(tokenizer):
        raise BackendError(f"this model's tokenizer ({_version(tokenizer)}) cannot encode "
                           "tools: ask without tools (tools: false), or use a model with "
                           "function calling (tokenizer v2 or newer)")
    urls = image_urls(messages)
    if urls and images is None:
        raise BackendError("this model has no vision encoder: it cannot read images (remove "
                           "the image, or use a vision model such as Pixtral)")
    decoded = []
    if urls:
        assert images is not None
        try:
            engine.check_image_counts(image_counts(messages), images)
            for url in urls:
                if not url.startswith("data:"):
                    raise engine.ImageError("only data: URIs are accepted for images (no URL "
                                            "is fetched)")
                decoded.append(engine.image_from_data_uri(url, images))
        except engine.ImageError as e:
            raise BackendError(f"image refused: {e}") from None
    try:
        request = ChatCompletionRequest.from_openai(
            [dict(m) for m in messages if _meaningful(m)],
            tools=_openai_tools(tools) or None)
    except (ValidationError, ValueError, TypeError, MistralCommonException) as e:
        raise BackendError(f"invalid conversation: {_first_line(e)}") from None
    if decoded:
        pending = iter(decoded)
        for message in request.messages:
            if isinstance(message, UserMessage) and isinstance(message.content, list):
                message.content = [ImageChunk(image=next(pending))
                                   if isinstance(chunk, ImageURLChunk) else chunk
                                   for chunk in message.content]
    try:
        tokenized = tokenizer.encode_chat_completion(request)
    except (MistralCommonException, ValueError, TypeError, AssertionError) as e:
        raise BackendError(f"cannot encode the conversation with this model's tokenizer "
                           f"({_version(tokenizer)}): {_first_line(e)}") from None
    return ChatPrompt(list(tokenized.tokens), decoded)


def can_encode_tools(tokenizer: MistralTokenizer) -> bool:
    """Whether the tokenizer has the tool tokens (v1 has none: mistral-common would silently
    leave the tools out of the prompt)."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    return bool(raw.get_special_token("[AVAILABLE_TOOLS]") != raw.unk_id)


def _version(tokenizer: MistralTokenizer) -> str:
    raw = tokenizer.instruct_tokenizer.tokenizer
    return str(getattr(raw.version, "value", raw.version))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
