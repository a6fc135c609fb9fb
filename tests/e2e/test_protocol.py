"""JSON-RPC over the real stdio server, byte for byte: bad input gets an error reply and the
server keeps serving; every request gets exactly one reply; stdout carries only JSON-RPC."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.rpc import FAKE_SERVER, RawServer

DOC = "file:///w/a.py"
TEXT = "def add(a, b):\n    return foo()\n\nprint(add(1, 2))\n"
CURSOR = {"line": 1, "character": 15}  # inside foo(|)


def open_doc(server: RawServer, text: str = TEXT, uri: str = DOC) -> None:
    server.notify("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": text}})


def inline(server: RawServer, position: dict[str, int] = CURSOR, uri: str = DOC) -> int:
    return server.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": position, "context": {"triggerKind": 2}})


def assert_clean(server: RawServer) -> None:
    """Nothing but JSON-RPC frames on stdout, and no traceback ever sent to the client."""
    assert server.garbage == []
    frames = list(server.notifications)
    while not server.frames.empty():
        frames.append(server.frames.get())
    wire = json.dumps(frames)
    assert "Traceback" not in wire and "/work/" not in wire and ".py\\\", line" not in wire


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[RawServer]:
    """The server with a scripted backend: 40 tokens of "x", 50 ms each (2 s in all)."""
    server = RawServer(FAKE_SERVER, env={"FAKE_TOKENS": json.dumps(["x"] * 40),
                                         "FAKE_DELAY": "0.05",
                                         "FAKE_LOG": str(tmp_path / "backend.log")})
    server.initialize()
    server.wait_for_status("ready")
    yield server
    server.close()


def backend_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "backend.log"
    return path.read_text().splitlines() if path.exists() else []


def test_malformed_json_gets_a_parse_error_and_the_server_goes_on(fake: RawServer) -> None:
    fake.send_bytes(b'{"jsonrpc": "2.0", "id": 7, "method": ')
    reply = fake.response(None)
    assert reply["error"]["code"] == -32700
    fake.send_bytes(b"\xff\xfe not utf-8")
    assert fake.response(None)["error"]["code"] == -32700
    open_doc(fake)
    assert "result" in fake.response(inline(fake))
    assert_clean(fake)


def test_ill_typed_params_get_invalid_params_not_silence(fake: RawServer) -> None:
    open_doc(fake)
    msg = fake.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": DOC}, "position": {"line": "one", "character": 2},
        "context": {"triggerKind": 2}})
    reply = fake.response(msg, timeout=10)
    assert reply["error"] == {"code": -32602,
                              "message": "invalid params for textDocument/inlineCompletion"}
    assert "result" in fake.response(inline(fake))
    assert_clean(fake)


def test_unknown_document_and_positions_out_of_range(fake: RawServer) -> None:
    open_doc(fake)
    reply = fake.response(inline(fake, uri="file:///w/never-opened.py"))
    assert reply["error"]["code"] == -32602
    assert "file:///w/never-opened.py" in reply["error"]["message"]
    reply = fake.response(inline(fake, position={"line": 1, "character": 99}))
    assert reply["error"]["code"] == -32602
    assert "past the end of line 1" in reply["error"]["message"]
    reply = fake.response(inline(fake, position={"line": 40, "character": 0}))
    assert reply["error"]["code"] == -32602
    assert "line 40" in reply["error"]["message"]
    assert "result" in fake.response(inline(fake))
    assert_clean(fake)


def test_requests_before_initialize_are_refused() -> None:
    server = RawServer(FAKE_SERVER)
    try:
        msg = inline(server)
        assert server.response(msg)["error"]["code"] == -32002
        assert "result" in server.initialize()
    finally:
        server.close()


def test_an_unexpected_backend_error_reaches_the_client_without_traceback(tmp_path: Path) -> None:
    server = RawServer(FAKE_SERVER, env={"FAKE_RAISE": "kaboom in the engine"})
    try:
        server.initialize()
        server.wait_for_status("ready")
        open_doc(server)
        reply = server.response(inline(server))
        assert reply["error"]["code"] == -32603
        assert "data" not in reply["error"]
        open_doc(server, uri="file:///w/b.py")
        assert server.response(inline(server, uri="file:///w/b.py"))["error"]["code"] == -32603
        assert_clean(server)
        server.wait_for_stderr("kaboom in the engine")
    finally:
        server.close()


def test_cancel_request_replies_once_with_request_cancelled_and_stops_the_backend(
        fake: RawServer, tmp_path: Path) -> None:
    open_doc(fake)
    msg = inline(fake)
    time.sleep(0.3)  # the backend is streaming by now
    fake.notify("$/cancelRequest", {"id": msg})
    reply = fake.response(msg, timeout=5)
    assert reply["error"]["code"] == -32800
    # The engine thread is free again at once: a new request completes in full.
    started = time.monotonic()
    done = fake.response(inline(fake), timeout=10)
    assert done["result"]["items"][0]["insertText"] == "x" * 40
    assert time.monotonic() - started < 3.5
    first = backend_log(tmp_path)[0].split()
    assert first[2] != "steps=40" and first[3] == "cancelled"
    assert int(first[2].removeprefix("steps=")) <= 10
    with pytest.raises(queue.Empty):  # exactly one reply: no second one comes
        fake.response(msg, timeout=0.5)
    assert_clean(fake)


def test_a_newer_request_for_the_document_supersedes_the_running_one(
        fake: RawServer, tmp_path: Path) -> None:
    open_doc(fake)
    first = inline(fake)
    time.sleep(0.3)
    second = inline(fake)
    reply1, reply2 = fake.response(first, timeout=5), fake.response(second, timeout=10)
    assert reply1["result"] == {"items": []}
    assert reply2["result"]["items"][0]["insertText"] == "x" * 40
    log = backend_log(tmp_path)
    assert log[0].split()[3] == "cancelled" and log[1].split()[2:] == ["steps=40", "length"]
    assert_clean(fake)


def test_other_documents_are_not_superseded(fake: RawServer, tmp_path: Path) -> None:
    open_doc(fake)
    open_doc(fake, uri="file:///w/b.py")
    first, second = inline(fake), inline(fake, uri="file:///w/b.py")
    for msg in (first, second):
        assert fake.response(msg, timeout=10)["result"]["items"][0]["insertText"] == "x" * 40


def test_shutdown_then_exit_is_code_0_exit_alone_is_code_1() -> None:
    server = RawServer(FAKE_SERVER)
    server.initialize()
    assert server.response(server.request("shutdown"))["result"] is None
    server.notify("exit")
    assert server.proc.wait(10) == 0
    server = RawServer(FAKE_SERVER)
    server.initialize()
    server.notify("exit")
    assert server.proc.wait(10) == 1


def test_postprocessing_applies_over_the_wire(tmp_path: Path) -> None:
    """The scripted raw completion `a, b)` + junk inside `foo(|)` becomes `a, b`; stray prints
    on stdout (Python's or a native library's) do not reach the JSON-RPC stream."""
    server = RawServer(FAKE_SERVER, env={"FAKE_TOKENS": json.dumps(
        ["a", ",", " b", ")", "\n", "    junk()"]), "FAKE_PRINT": "1"})
    try:
        server.initialize()
        server.wait_for_status("ready")
        open_doc(server)
        reply = server.response(inline(server))
        assert reply["result"] == {"items": [{"insertText": "a, b", "range": {
            "start": CURSOR, "end": CURSOR}}]}
        assert_clean(server)
        time.sleep(0.2)
        assert "stray print from a library\n" in server.stderr
        assert "stray native write\n" in server.stderr
    finally:
        server.close()


def scripted(tmp_path: Path, options: dict[str, object]) -> RawServer:
    server = RawServer(FAKE_SERVER, env={"FAKE_TOKENS": json.dumps(["x"] * 40),
                                         "FAKE_DELAY": "0.05",
                                         "FAKE_LOG": str(tmp_path / "backend.log")})
    server.initialize(options)
    server.wait_for_status("ready")
    open_doc(server)
    return server


def test_the_time_budget_ends_a_completion_with_what_it_has(tmp_path: Path) -> None:
    server = scripted(tmp_path, {"completion": {"timeBudgetMs": 300}})
    try:
        text = server.response(inline(server))["result"]["items"][0]["insertText"]
        assert 3 <= len(text) <= 8 and set(text) == {"x"}  # 300 ms of 50 ms tokens
    finally:
        server.close()


def test_debounce_skips_requests_superseded_while_waiting(tmp_path: Path) -> None:
    server = scripted(tmp_path, {"completion": {"debounceMs": 300}})
    try:
        first = inline(server)
        time.sleep(0.05)
        second = inline(server)
        assert server.response(first)["result"] == {"items": []}
        assert server.response(second)["result"]["items"][0]["insertText"] == "x" * 40
        assert backend_log(tmp_path) == [f"1 {DOC} steps=40 length"]  # the first never ran
        cancelled = [n["params"] for n in server.notifications
                     if n.get("method") == "tramontane/status" and
                     n["params"].get("reason") == "cancelled"]
        assert cancelled  # the editor is told why the first came back empty
    finally:
        server.close()


def test_completions_while_loading_come_back_empty_and_the_status_says_why() -> None:
    """A client that asks before the model is ready (Microsoft's LSP client library sent ten
    requests in its first 20 s) gets empty replies, each followed by a status naming why."""
    server = RawServer(FAKE_SERVER, env={"FAKE_LOADING": "1"})
    try:
        server.initialize()
        assert server.wait_for_status("loading")["message"] == "Loading the scripted model"
        open_doc(server)
        for _ in range(3):
            assert server.response(inline(server))["result"] == {"items": []}
            status = server.wait_for_status("loading")
            assert status == {"state": "loading", "message": "Loading the scripted model",
                              "reason": "loading"}
        assert_clean(server)
    finally:
        server.close()
