"""The remote layers (http.py, openai_wire.py) against a real vLLM serving a tiny random float32
checkpoint on 127.0.0.1 (conftest's `vllm_server`; skip with -m "not vllm")."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import torch

import engine
from lsp_server.backends.http import RemoteClient, RemoteError
from lsp_server.backends.openai_wire import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    ChatStream,
    CompletionStream,
    chat_request,
    completion_request,
)
from lsp_server.backends.wire import Finish, Message, Sampling, TextDelta, Tool, ToolCall, Usage

from .vllm import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    ("def fibonacci(n):\n    ", "\n\nprint(fibonacci(10))"),
    ("import os\n\nclass Config:\n    def __init__(self", "\n        self.path = path\n"),
    ("", "}"),
]
READ_FILE = Tool("read_file", "Read a file of the workspace", {
    "type": "object", "properties": {"path": {"type": "string", "enum": ["main.py"]}},
    "required": ["path"], "additionalProperties": False})


@pytest.fixture(scope="module")
def model(vllm_server: VllmServer) -> Iterator[engine.Model]:
    """The in-process engine on the very checkpoint vLLM serves, in float32 too."""
    yield engine.load(vllm_server.model_dir, dtype=torch.float32)


@pytest_asyncio.fixture
async def remote(vllm_server: VllmServer) -> AsyncIterator[RemoteClient]:
    client = RemoteClient(vllm_server.url + "/v1", label="vllm")
    yield client
    await client.aclose()


async def complete(remote: RemoteClient, body: dict[str, Any]
                   ) -> tuple[list[TextDelta], Finish]:
    parser = CompletionStream("vllm")
    deltas = []
    async with remote.stream(COMPLETIONS_PATH, body) as events:
        async for event in events:
            deltas += parser.feed(event)
    return deltas, parser.finish()


@pytest.mark.asyncio
async def test_fim_token_prompt_gives_the_engines_greedy_tokens_and_text(
        remote: RemoteClient, model: engine.Model) -> None:
    prompts = [engine.encode_fim(model.tokenizer, prefix, suffix) for prefix, suffix in PROMPTS]
    expected, _ = engine.generate(prompts, model, max_tokens=32, temperature=0.0)
    for prompt, tokens in zip(prompts, expected, strict=True):
        body = completion_request("tiny", prompt, Sampling(max_tokens=32),
                                  return_token_ids=True)
        deltas, finish = await complete(remote, body)
        assert [t for d in deltas for t in d.token_ids] == tokens
        # The text the local backend shows (exact bytes per token: a leading space stays).
        text = engine.TextStream(model.tokenizer)
        assert "".join(d.text for d in deltas) == \
            "".join(text.push(t) for t in tokens) + text.flush()
        assert finish == Finish("length" if len(tokens) == 32 else "stop",
                                Usage(len(prompt), len(tokens)))


@pytest.mark.asyncio
async def test_suffix_text_is_refused_for_mistral_models(remote: RemoteClient) -> None:
    """Why FIM goes as token ids: vLLM's answer to `suffix`, as one clear error."""
    body = {"model": "tiny", "prompt": "def f(", "suffix": "\n", "max_tokens": 4, "stream": True}
    with pytest.raises(RemoteError) as caught:
        async with remote.stream(COMPLETIONS_PATH, body) as events:
            async for _ in events:
                pass
    assert caught.value.status == 400
    assert str(caught.value).startswith("vllm: HTTP 400 Bad Request: ")
    assert "suffix is only supported for models with FIM completion rendering" in \
        str(caught.value)


async def chat(remote: RemoteClient, body: dict[str, Any]
               ) -> tuple[list[TextDelta | ToolCall], Finish]:
    parser = ChatStream("vllm")
    out: list[TextDelta | ToolCall] = []
    async with remote.stream(CHAT_PATH, body) as events:
        async for event in events:
            out += parser.feed(event)
    pending, finish = parser.finish()
    return out + pending, finish


@pytest.mark.asyncio
async def test_a_forced_tool_call_streams_back_whole(remote: RemoteClient) -> None:
    """A named tool choice: vLLM constrains the output to `[{"name": ..., "arguments": {...}}]`
    (no free whitespace: see the fixture) and streams it as tool-call fragments, which come out
    as one call. The random model never says EOS, so the stop string ends the call.

    vLLM 0.32 defect, kept visible here: the streamed arguments start with a stray ':' (the
    non-streaming answer to the same request has `{"path": "main.py"}`). The server validates
    arguments as for local calls, so such a call is refused, not run."""
    body = chat_request("tiny", [Message("user", "Show me main.py")],
                        Sampling(max_tokens=80, stop=("}]",)), [READ_FILE],
                        tool_choice={"type": "function", "function": {"name": "read_file"}})
    body["include_stop_str_in_output"] = True  # vLLM's extension: keep the closing brace
    events, finish = await chat(remote, body)
    [call] = events
    assert isinstance(call, ToolCall)
    assert call.name == "read_file"
    assert re.fullmatch("[A-Za-z0-9]{9}", call.id)  # mistral-common's tool-call id format
    assert call.arguments == ':{"path":"main.py"}'
    assert finish.reason == "stop"
    assert finish.usage is not None and finish.usage.completion_tokens > 10


@pytest.mark.asyncio
async def test_a_chat_with_tools_and_a_tool_turn_streams_text(remote: RemoteClient) -> None:
    """Auto tool choice through the mistral tool parser, after an assistant tool call and its
    result: vLLM accepts our messages (mistral-common validates them) and streams the answer."""
    call = ToolCall("abcDEF123", "read_file", '{"path": "main.py"}')
    messages = [Message("system", "You are a coding assistant."),
                Message("user", "What does main.py print?"),
                Message("assistant", tool_calls=(call,)),
                Message("tool", 'print("hello")', tool_call_id=call.id, name=call.name)]
    body = chat_request("tiny", messages, Sampling(max_tokens=16), [READ_FILE])
    events, finish = await chat(remote, body)
    assert finish.reason in ("length", "stop", "tool_calls")
    assert finish.usage is not None and finish.usage.prompt_tokens > 20
    texts = [e for e in events if isinstance(e, TextDelta)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert texts or calls
    assert all(isinstance(e.text, str) for e in texts)


@pytest.mark.asyncio
async def test_cancelling_the_stream_aborts_the_vllm_request(
        remote: RemoteClient, vllm_server: VllmServer, model: engine.Model) -> None:
    """vLLM aborts a request when its client disconnects: no request left running, none
    finished (a client's abort is not a finish), and the generation stopped short of its 3000
    tokens."""
    assert vllm_server.idle(30)
    finished = vllm_server.finished()
    generated = vllm_server.metric("vllm:generation_tokens_total")
    prompt = engine.encode_fim(model.tokenizer, *PROMPTS[0])
    body = completion_request("tiny", prompt, Sampling(max_tokens=3000))
    body["ignore_eos"] = True  # vLLM's extension: the request runs until cancelled
    started = asyncio.Event()

    async def read() -> None:
        async with remote.stream(COMPLETIONS_PATH, body) as events:
            async for _ in events:
                started.set()

    task = asyncio.ensure_future(read())
    await asyncio.wait_for(started.wait(), 60)
    # The gauge may trail the stream: with both cores busy, the first token was read here while
    # /metrics still said no request ran.
    deadline = time.monotonic() + 10
    while vllm_server.metric("vllm:num_requests_running") != 1:
        assert time.monotonic() < deadline, "vLLM does not count the request as running"
        await asyncio.sleep(0.02)
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while time.monotonic() - cancelled < 10:
        running = vllm_server.metric("vllm:num_requests_running")
        if running == 0:
            break
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - cancelled
    assert running == 0
    assert elapsed < 5, f"vLLM took {elapsed:.2f} s to abort"
    # Its generated-token count stands still (idle) short of the 3000, and the request is not
    # counted as finished: aborted. (Not how short: a loaded 2-core machine let vLLM generate
    # 1221 tokens between the first one read and the abort.)
    assert vllm_server.idle(5)
    assert vllm_server.finished() == finished
    assert vllm_server.metric("vllm:generation_tokens_total") - generated < 3000
