"""Chat prompts: mistral-common's encoding of the messages, tools and images, with refusals for
what the model cannot take (tools without tool tokens, images without vision, remote URLs)."""

from __future__ import annotations

from typing import Any

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine
from engine.checkpoints.tiny import tokenizer_source
from lsp_server.backends.base import BackendError, ToolSpec
from lsp_server.chat.prompt import encode_chat, image_urls

READ = ToolSpec("read_file", "Read a file",
                {"type": "object", "properties": {"path": {"type": "string"}}})
PNG = "data:image/png;base64,iVBORw0KGgo="


def tokenizer(version: str) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tokenizer_source(version)))


def test_the_prompt_is_mistral_commons_encoding() -> None:
    tok = tokenizer("v3")
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello"}]
    want = tok.encode_chat_completion(ChatCompletionRequest.from_openai(
        messages, tools=[{"type": "function", "function": {
            "name": "read_file", "description": "Read a file", "parameters": READ.parameters}}]))
    assert encode_chat(tok, messages, [READ], None).tokens == want.tokens


def test_an_answer_that_said_nothing_is_left_out() -> None:
    tok = tokenizer("v3")
    said_nothing = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": "b"}]
    assert encode_chat(tok, said_nothing, [], None).tokens == encode_chat(
        tok, [said_nothing[0], said_nothing[2]], [], None).tokens


@pytest.mark.parametrize(("version", "messages", "tools", "decoder", "message"), [
    ("v1", [{"role": "user", "content": "hi"}], [READ], None,
     "this model's tokenizer (v1) cannot encode tools: ask without tools (tools: false), or use "
     "a model with function calling (tokenizer v2 or newer)"),
    ("v3", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}],
     [], None, "this model has no vision encoder: it cannot read images (remove the image, or "
     "use a vision model such as Pixtral)"),
    ("tekken", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}], [],
     engine.ImageLimits(), "image refused: only data: URIs are accepted for images (no URL "
     "is fetched)"),
    ("v3", [{"role": "tool", "content": "x", "tool_call_id": "abcdefghi"}], [], None,
     "cannot encode the conversation with this model's tokenizer (v3): "),
])
def test_refusals_say_why(version: str, messages: list[dict[str, Any]], tools: list[ToolSpec],
                          decoder: Any, message: str) -> None:
    with pytest.raises(BackendError) as e:
        encode_chat(tokenizer(version), messages, tools, decoder)
    assert str(e.value).startswith(message)


def test_image_urls_are_listed_in_order() -> None:
    assert image_urls([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}},
                                     {"type": "text", "text": "x"},
                                     {"type": "image_url", "image_url": "b"}]},
        {"role": "assistant", "content": "no"}]) == ["a", "b"]
