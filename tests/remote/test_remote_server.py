"""The language server over stdio with a remote backend pointed at the misbehaving server: each
fault gives the editor an empty (or partial, at the budget) completion with a clear status
within the time budget, memory stays bounded, and a normal completion follows on the same
server process. Also: switching `backend.kind` at run time, Mistral's FIM over the server, a
chat turn whose tool call comes from a recorded vLLM stream, and the API key kept secret."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lsp_server.backends import tokenizers

from .conftest import FaultyServer
from .lsp import Server

pytestmark = pytest.mark.slow

V3 = str(tokenizers.data_folder() / tokenizers.V3)
BUDGET_MS = 2000
KEY_ENV = "TRAMONTANE_TEST_SERVER_KEY"
KEY = "sk-server-test-5eCr3t-0123456789"
TEXT = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
CURSOR = (3, 0)  # the empty line before print(): multi-line mode
DOC = "file:///w/add.py"


def backend(url: str, kind: str = "openai", **extra: Any) -> dict[str, Any]:
    return {"backend": {"kind": kind, "url": url, "model": "tiny", "tokenizer": V3, **extra},
            "completion": {"timeBudgetMs": BUDGET_MS}}


def unique() -> str:
    return f"id={uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server(faulty: FaultyServer) -> Iterator[Server]:
    """One server process for the module: the faults must not take it down."""
    server = Server(env={KEY_ENV: KEY})
    status = server.start(backend(faulty.url + "/ok"))
    assert status["state"] == "ready", status
    server.open(TEXT, DOC)
    yield server
    server.close()
    assert not any(KEY in line for line in server.stderr)


def normal_completion(server: Server, faulty: FaultyServer) -> None:
    """The same process serves a normal completion right after a fault."""
    assert server.configure(backend(faulty.url + "/ok"))["state"] == "ready"
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == ["def add(a, b)"]
    assert (status["state"], status["promptTokens"], status["generatedTokens"]) == \
        ("ready", 5, 3)


def label(faulty: FaultyServer) -> str:
    return faulty.url.removeprefix("http://")


ERRORS = [
    ("/status/500", "HTTP 500 Internal Server Error: something went wrong (500)", 2),
    ("/status/429/retry_after=7", "HTTP 429 Too Many Requests; rate limited, retry after 7 s: "
     "something went wrong (429)", 1),
    ("/status/401", "HTTP 401 Unauthorized; check the API key in backend.apiKeyEnv (none set): "
     "something went wrong (401)", 1),
    ("/broken-sse", "malformed event (Unterminated string starting at: line 1 column 23 (char "
     "22)): {\"choices\": [{\"text\": \"de", 1),
    ("/not-object", "malformed event (not a JSON object): [1, 2]", 1),
    ("/no-done", "the stream ended before [DONE]", 1),
    ("/html", "expected an event stream, got text/html (is backend.url the API's /v1?)", 1),
    ("/gzip", "the stream is compressed (gzip); this client reads identity-encoded streams "
     "only", 1),
]


@pytest.mark.parametrize(("path", "message", "requests"), ERRORS)
def test_http_errors_and_broken_streams_are_an_empty_completion_and_a_clear_status(
        server: Server, faulty: FaultyServer, path: str, message: str, requests: int) -> None:
    path = f"{path}/{unique()}"
    assert server.configure(backend(faulty.url + path))["state"] == "ready"
    started = time.monotonic()
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert time.monotonic() - started < BUDGET_MS / 1000 + 1
    assert texts == []
    assert status == {"state": "error", "message": f"{label(faulty)}: {message}",
                      "reason": "error"}
    # A 500 is retried once (completions only); nothing else is.
    assert len(faulty.requests_to(f"{path}/completions")) == requests
    normal_completion(server, faulty)


def test_a_404_names_the_path_and_the_settings_to_check(server: Server,
                                                        faulty: FaultyServer) -> None:
    path = f"/status/404/{unique()}"
    server.configure(backend(faulty.url + path))
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == []
    assert status["message"] == f"{label(faulty)}: HTTP 404 Not Found for {path}/completions; " \
        "check backend.url and backend.model: something went wrong (404)"
    normal_completion(server, faulty)


def test_a_server_that_is_down(server: Server, faulty: FaultyServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    status = server.configure(backend(f"http://127.0.0.1:{port}/v1"))
    assert status["state"] == "ready"  # it may be starting: the requests will say
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == []
    assert status == {"state": "error", "reason": "error", "message":
                      f"127.0.0.1:{port}: cannot connect (All connection attempts failed)"}
    normal_completion(server, faulty)


@pytest.mark.parametrize(("path", "text"), [
    ("/stall-headers", None),  # no answer at all
    ("/keepalive", None),  # comments, never an event
    ("/stall-mid", "def"),  # one event, then silence
    ("/endless/interval=0.05", "x"),  # a valid event every 50 ms, forever
    ("/garbage", None),  # random bytes in 1 KiB lines, forever
])
def test_stalls_and_endless_streams_end_at_the_time_budget_and_close_the_stream(
        server: Server, faulty: FaultyServer, path: str, text: str | None) -> None:
    """At the budget the editor gets what arrived (post-processed), or nothing with "budget
    exhausted", and the connection is closed."""
    path = f"{path}/{unique()}"
    server.configure(backend(faulty.url + path))
    started = time.monotonic()
    texts, status = server.complete(*CURSOR, uri=DOC)
    elapsed = time.monotonic() - started
    assert BUDGET_MS / 1000 - 0.1 < elapsed < BUDGET_MS / 1000 + 1, (texts, status)
    if text is None:
        assert texts == []
        assert (status["state"], status["reason"]) == ("ready", "budget exhausted")
    else:
        assert len(texts) == 1 and set(texts[0]) == set(text) and status["state"] == "ready"
    for _ in range(50):
        if f"{path}/completions" in faulty.log()["disconnects"]:
            break
        time.sleep(0.05)
    assert f"{path}/completions" in faulty.log()["disconnects"]
    normal_completion(server, faulty)


def test_a_100_mb_line_is_refused_with_bounded_memory(server: Server,
                                                      faulty: FaultyServer) -> None:
    before = server.peak_rss_mib()
    server.configure(backend(faulty.url + f"/huge-line/{unique()}"))
    started = time.monotonic()
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert time.monotonic() - started < BUDGET_MS / 1000 + 1
    assert texts == []
    assert status["message"] == f"{label(faulty)}: a stream line over 1024 KiB; stream abandoned"
    growth = server.peak_rss_mib() - before
    assert growth < 32, f"the server's peak memory grew by {growth:.0f} MiB"
    normal_completion(server, faulty)


def test_switching_backend_kind_at_run_time(server: Server, faulty: FaultyServer) -> None:
    path = f"/ok/{unique()}"
    status = server.configure(backend(faulty.url + path, kind="mistral"))
    assert status == {"state": "ready", "fastDecode": False, "message": (
        f"tiny at {label(faulty)} (mistral backend, tokenizer {tokenizers.V3} v3)")}
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == ["def add(a, b)"]
    # Mistral's FIM endpoint gets the prompt windows as text.
    [request] = faulty.requests_to(f"{path}/fim/completions")
    body = json.loads(request["body"])
    assert (body["prompt"], body["suffix"]) == ("def add(a, b):\n    return a + b\n\n",
                                                "\nprint(add(1, 2))\n")
    status = server.configure({"backend": {"kind": "local"}, "model": None})
    assert status == {"state": "error", "reason": "no model", "message":
                      "No model configured: set `model` to a Mistral checkpoint folder"}
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == [] and status["reason"] == "no model"
    normal_completion(server, faulty)


def test_a_misconfigured_backend_is_an_error_status_with_what_to_check(
        server: Server, faulty: FaultyServer) -> None:
    options = backend(faulty.url + "/ok")
    options["backend"]["tokenizer"] = None
    options["backend"]["model"] = "my-finetune"
    status = server.configure(options)
    assert status == {"state": "error", "reason": "no model", "message": (
        "Tramontane no tokenizer known for the served model 'my-finetune': set "
        "backend.tokenizer to its tokenizer file (tekken.json or tokenizer.model.v3) or its "
        "model folder. Check the `backend` settings (kind, url, model, tokenizer, apiKeyEnv, "
        "caBundle).")}
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == [] and status["reason"] == "no model"
    normal_completion(server, faulty)


def test_the_api_key_is_sent_and_never_shown(server: Server, faulty: FaultyServer) -> None:
    path = f"/echo-key/{unique()}"
    server.configure(backend(faulty.url + path, apiKeyEnv=KEY_ENV))
    texts, status = server.complete(*CURSOR, uri=DOC)
    assert texts == []
    assert status["message"] == f"{label(faulty)}: HTTP 401 Unauthorized; check the API key " \
        f"in ${KEY_ENV}: Invalid authorization header: Bearer ***"
    assert faulty.requests_to(f"{path}/completions")[0]["authorization"] == f"Bearer {KEY}"
    assert not any(KEY in json.dumps(frame) for frame in server.notifications)
    normal_completion(server, faulty)


def test_a_chat_turn_runs_the_tool_call_of_a_recorded_vllm_stream(
        server: Server, faulty: FaultyServer) -> None:
    """vLLM's forced tool call (arguments with its stray ':'), recorded: the server repairs the
    arguments, validates them against the client tool's schema, asks the editor to run it,
    sends the result back, and streams the answer that follows."""
    path = f"/tool-call/{unique()}"
    server.configure(backend(faulty.url + path))
    calls: list[dict[str, Any]] = []

    def run_tool(params: dict[str, Any]) -> dict[str, Any]:
        calls.append(params)
        return {"content": "print('hello')"}

    tool = {"name": "read_file", "description": "Read a file of the workspace",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                           "required": ["path"]}}
    reply = server.chat({"chatId": "t1", "messages": [{"role": "user",
                                                        "content": "Show me main.py"}],
                         "tools": False, "clientTools": [tool]}, run_tool)
    result = reply["result"]
    [call] = calls
    assert (call["name"], call["arguments"], call["chatId"]) == \
        ("read_file", {"path": "main.py"}, "t1")
    assert [d["kind"] for d in server.deltas()] == ["toolCall", "toolResult", "text", "text",
                                                    "text"]
    assert result["message"] == {"role": "assistant", "content": "def add(a, b)"}
    assert result["finishReason"] == "stop"
    _, second = faulty.requests_to(f"{path}/chat/completions")
    messages = json.loads(second["body"])["messages"]
    assert messages[1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call["id"], "type": "function",
            "function": {"name": "read_file", "arguments": '{"path":"main.py"}'}}]},
        {"role": "tool", "content": "print('hello')", "tool_call_id": call["id"],
         "name": "read_file"}]
    normal_completion(server, faulty)
