"""The language server over stdio with `backend.kind = "openai"` against a real vLLM serving a
tiny random float32 checkpoint (conftest's `vllm_server`), beside the same server running the
same checkpoint in process: the same greedy completions, the time budget and `$/cancelRequest`
closing the stream (vLLM aborts the request), a chat with tools streamed through vLLM (skip
with -m "not vllm")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import engine
from lsp_server.backends.base import ToolSpec
from lsp_server.chat.prompt import encode_chat

from .lsp import Server
from .vllm import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Cursors of lsp.TEXT: inside a function body, at a line start, after a `def`, mid-line, ...
CURSORS = [(4, 4), (1, 0), (7, 8), (8, 12), (10, 0), (2, 16)]
READ_FILE: dict[str, Any] = {"name": "read_file", "description": "Read a file of the workspace",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                            "required": ["path"]}}
CHAT = {"maxTokens": 24, "temperature": 0.0}


def remote_options(vllm: VllmServer, **completion: Any) -> dict[str, Any]:
    return {"backend": {"kind": "openai", "url": vllm.url + "/v1", "model": vllm.model,
                        "tokenizer": str(vllm.model_dir)},
            "completion": {"maxTokens": 32, **completion}, "chat": CHAT}


@pytest.fixture(scope="module")
def remote(vllm_server: VllmServer) -> Iterator[Server]:
    server = Server()
    status = server.start(remote_options(vllm_server))
    assert status["state"] == "ready", status
    server.open()
    yield server
    server.close()


@pytest.fixture(scope="module")
def local(vllm_server: VllmServer) -> Iterator[Server]:
    """The in-process engine on the checkpoint vLLM serves, in float32 too."""
    server = Server()
    status = server.start({"model": str(vllm_server.model_dir), "dtype": "float32",
                           "compile": False, "completion": {"maxTokens": 32}, "chat": CHAT})
    assert status["state"] == "ready", status
    server.open()
    yield server
    server.close()


def aborts(vllm: VllmServer) -> int:
    return vllm.log_path.read_text(errors="replace").count(" aborted.")


def wait_for_aborts(vllm: VllmServer, count: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while aborts(vllm) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return aborts(vllm)


def last_metric(server: Server) -> dict[str, Any]:
    """The `tramontane/metrics` of the last request (sent once the backend is done with it)."""
    deadline = time.monotonic() + 10
    while True:
        metrics = [n["params"] for n in server.notifications
                   if n.get("method") == "tramontane/metrics"]
        if metrics:
            return metrics[-1]
        server.notifications.append(server.next_frame(max(0.01, deadline - time.monotonic())))


def test_the_ready_status_names_the_served_model(remote: Server, vllm_server: VllmServer) -> None:
    assert remote.first_status == {"state": "ready", "fastDecode": False, "message": (
        f"tiny at 127.0.0.1:{vllm_server.port} (openai backend, tokenizer tokenizer.model.v3 "
        "v3)")}


def test_inline_completions_through_vllm_equal_the_in_process_engines(
        remote: Server, local: Server) -> None:
    """Same document, same cursors: the prompt windows, the FIM prompt (token ids), vLLM's
    greedy tokens and post-processing give the very completions the local engine gives."""
    shown = 0
    for line, character in CURSORS:
        expected, local_status = local.complete(line, character)
        texts, status = remote.complete(line, character)
        assert texts == expected, (line, character)
        # vLLM counted the prompt we built: the same tokens the local engine ran.
        assert status["promptTokens"] == local_status["promptTokens"], (line, character)
        assert status.get("reason") == local_status.get("reason")
        shown += bool(texts)
    assert shown >= 4


@dataclass(frozen=True)
class BudgetRun:
    short: list[str]  # the 32-token completion at the cursor
    texts: list[str]  # the completion allowed 4000 tokens, cut by the 4 s time budget
    status: dict[str, Any]
    seconds: float  # from the request to the reply, as the editor saw it
    metric: dict[str, Any]  # what the backend counted when it closed the stream
    aborted: int  # requests vLLM logged as aborted meanwhile
    generated: float  # tokens vLLM generated meanwhile


@pytest.fixture(scope="module")
def budget_run(remote: Server, vllm_server: VllmServer) -> BudgetRun:
    short, _ = remote.complete(4, 4)
    remote.settings(remote_options(vllm_server, maxTokens=4000, timeBudgetMs=4000))
    before, generated = aborts(vllm_server), \
        vllm_server.metric("vllm:generation_tokens_total")
    started = time.monotonic()
    texts, status = remote.complete(4, 4)
    seconds = time.monotonic() - started
    metric = last_metric(remote)
    aborted = wait_for_aborts(vllm_server, before + 1) - before
    generated = vllm_server.metric("vllm:generation_tokens_total") - generated
    remote.settings(remote_options(vllm_server))
    return BudgetRun(short, texts, status, seconds, metric, aborted, generated)


def test_at_the_time_budget_the_editor_gets_what_streamed_and_vllm_aborts(
        budget_run: BudgetRun) -> None:
    """Streaming: text arrives piece by piece, so when the time budget runs out the editor gets
    what came so far (post-processed: the start of the long completion), the stream is closed
    and vLLM aborts the request instead of generating the 4000 tokens it was allowed."""
    run = budget_run
    # The budget's timing is the faulty-server tests' claim (test_remote_server.py, to the
    # second); here the point is that the reply does not wait for the 4000 tokens (20 s at
    # vLLM's ~200 tokens/s on 2 cores). On a busy machine the server's loop runs the budget's
    # timer late: replies after 7-8 s were seen with three CPU hogs beside the test.
    assert run.seconds < 12
    assert run.metric["cancelled"] is True and 0 < run.metric["generatedTokens"] < 4000
    assert run.aborted == 1
    assert run.generated < 3000
    assert len(run.texts) == 1 and len(run.short) == 1
    # The same greedy tokens, cut at another place: one text begins the other.
    assert run.texts[0] and (run.texts[0].startswith(run.short[0])
                             or run.short[0].startswith(run.texts[0]))
    assert run.status["state"] == "ready" and run.status.get("reason") is None


def test_cancel_request_closes_the_stream_and_vllm_aborts(remote: Server,
                                                          vllm_server: VllmServer) -> None:
    remote.settings(remote_options(vllm_server, maxTokens=4000, timeBudgetMs=120_000))
    before = aborts(vllm_server)
    msg = remote.inline(4, 4)  # ~4000 tokens of noise on one line: a minute on 2 cores
    deadline = time.monotonic() + 60
    while vllm_server.metric("vllm:num_requests_running") < 1:
        assert time.monotonic() < deadline, "vLLM never ran the request"
        time.sleep(0.05)
    time.sleep(0.3)
    cancelled = time.monotonic()
    remote.notify("$/cancelRequest", {"id": msg})
    assert remote.response(msg, timeout=30)["error"]["code"] == -32800
    while vllm_server.metric("vllm:num_requests_running") > 0:
        assert time.monotonic() - cancelled < 5, "vLLM still runs the cancelled request"
        time.sleep(0.02)
    assert wait_for_aborts(vllm_server, before + 1) == before + 1
    metric = last_metric(remote)
    assert metric["cancelled"] is True and metric["stoppedMs"] < 500
    remote.settings(remote_options(vllm_server))
    texts, _ = remote.complete(1, 0)  # and it goes on serving
    assert texts


def test_a_chat_with_tools_streams_through_vllm_as_through_the_engine(
        remote: Server, local: Server, vllm_server: VllmServer) -> None:
    """The tool schema reaches vLLM and is rendered by the model's tokenizer: vLLM counts
    exactly the prompt mistral-common encodes for these messages and tools. The answer streams
    in deltas that add up to the message, and (greedy, float32) equals the local engine's."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What does main.py do?"}]
    params = {"chatId": "v1", "messages": messages, "tools": False, "clientTools": [READ_FILE]}
    reply = remote.chat(params)
    result = reply["result"]
    deltas = remote.deltas()
    texts = [d["text"] for d in deltas if d["kind"] == "text"]
    assert len(texts) > 1 and "".join(texts) == result["message"]["content"]
    tokenizer = engine.load_tokenizer(engine.find_tokenizer_file(vllm_server.model_dir))
    prompt = encode_chat(tokenizer, messages, [ToolSpec(
        READ_FILE["name"], READ_FILE["description"], READ_FILE["parameters"])], None)
    assert result["usage"]["promptTokens"] == len(prompt.tokens)
    if not any(d["kind"] == "toolCall" for d in deltas):  # a random model may call it
        assert result["finishReason"] == "length"
        assert result["usage"]["generatedTokens"] == CHAT["maxTokens"]
        expected = local.chat(params)["result"]
        assert result["message"] == expected["message"]
