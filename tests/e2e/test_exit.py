"""Prompt exit (issue 10): `exit`, a closed stdin or SIGTERM end the process at once whatever the
engine thread is doing, with code 0 after `shutdown` and 1 otherwise.

The engine thread cannot be interrupted, so the process must not wait for it. Two ways to keep
it busy: the scripted backend blocking it for 30 s (deaf to cancellation), and the real server
compiling its decode step (several seconds on the tiny checkpoint). The bound asserted is 3 s
(this machine is shared and noisy); the figures measured are printed (`pytest -s`): 0.1-0.5 s
here, against 6-7 s before (the rest of a compile) and 30 s for the blocked engine thread."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.rpc import FAKE_SERVER, SERVER, RawServer

STATUS = "tramontane/status"
BOUND = 3.0  # seconds; the target is 1 s (see the module docstring)


def send_exit(server: RawServer) -> None:
    server.notify("exit")


def close_stdin(server: RawServer) -> None:
    assert server.proc.stdin is not None
    server.proc.stdin.close()


def sigterm(server: RawServer) -> None:
    server.proc.send_signal(signal.SIGTERM)


HOW: dict[str, Callable[[RawServer], None]] = {
    "exit": send_exit, "stdin closed": close_stdin, "SIGTERM": sigterm}


def descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            for child in map(int, children.read().split()):
                found += [child, *descendants(child)]
    return found


def end_and_time(server: RawServer, how: str, shutdown: bool) -> tuple[int, float]:
    if shutdown:
        assert server.response(server.request("shutdown"), timeout=10)["result"] is None
    started = time.monotonic()
    HOW[how](server)
    code = server.proc.wait(30)
    return code, time.monotonic() - started


@pytest.mark.parametrize("shutdown", [False, True], ids=["alone", "after shutdown"])
@pytest.mark.parametrize("how", list(HOW))
def test_exit_while_the_engine_thread_is_blocked(tmp_path: Path, how: str,
                                                 shutdown: bool) -> None:
    server = RawServer(FAKE_SERVER, env={"FAKE_BLOCK": "30",
                                         "FAKE_LOG": str(tmp_path / "backend.log")})
    try:
        server.initialize()
        server.wait_for_status("ready")
        server.notify("textDocument/didOpen", {"textDocument": {
            "uri": "file:///w/a.py", "languageId": "python", "version": 1, "text": "x = \n"}})
        server.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": "file:///w/a.py"}, "position": {"line": 0, "character": 4},
            "context": {"triggerKind": 2}})
        server.wait_for_stderr("scripted backend: blocking the engine thread", 30)
        code, seconds = end_and_time(server, how, shutdown)
        print(f"\n{how} ({'after shutdown' if shutdown else 'alone'}) while the engine thread "
              f"is blocked: the process ended {seconds:.3f} s later, code {code}")
        assert code == (0 if shutdown else 1)
        assert seconds < BOUND
        assert not (tmp_path / "backend.log").exists()  # the blocked request never finished
    finally:
        server.close()


@pytest.mark.parametrize("how", list(HOW))
def test_exit_during_a_compile(tiny_model: Path, how: str) -> None:
    """The real server compiling its decode step for the tiny checkpoint (torch's dynamo log
    says when tracing starts; the native step, which compiles nothing, is turned off): the
    process ends at once, and leaves no child behind."""
    server = RawServer(SERVER, env={"TORCH_LOGS": "dynamo", "TRAMONTANE_NATIVE_STEP": "0"})
    try:
        server.initialize({"model": str(tiny_model), "compile": True})
        server.wait_for_stderr("torchdynamo start tracing", 120)
        time.sleep(0.5)  # well inside the compile, which takes several seconds here
        children = descendants(server.proc.pid)
        code, seconds = end_and_time(server, how, shutdown=False)
        print(f"\n{how} during a compile: the process ended {seconds:.3f} s later, code {code}")
        assert code == 1
        assert seconds < BOUND
        frames = list(server.notifications)
        while not server.frames.empty():
            frames.append(server.frames.get())
        statuses = [f["params"] for f in frames if f.get("method") == STATUS]
        # Ready (the weights are in), the compiled step not yet in use: it was compiling.
        assert [s["state"] for s in statuses] == ["loading", "ready"]
        assert statuses[-1]["fastDecode"] is False
        time.sleep(1.5)  # what inductor's workers, if any, need to notice their parent is gone
        assert [pid for pid in children if os.path.exists(f"/proc/{pid}")] == []
    finally:
        server.close()


def test_tcp_uses_the_same_framing_and_exit(tmp_path: Path) -> None:
    """`--tcp`: the same reader (a 10^20 Content-Length is answered, the next message served)
    and the same exit (code 0 after shutdown, at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([*SERVER[:3], "--tcp", "--port", str(port)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with conn, conn.makefile("rb") as replies:
            def send(message: dict[str, object]) -> None:
                body = json.dumps({"jsonrpc": "2.0", **message}).encode()
                conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

            def reply() -> dict[str, object]:
                length = int(replies.readline().split(b":")[1])
                while replies.readline() != b"\r\n":
                    pass
                return json.loads(replies.read(length))  # type: ignore[no-any-return]

            send({"id": 1, "method": "initialize", "params": {"capabilities": {}}})
            assert "capabilities" in reply()["result"]  # type: ignore[operator]
            conn.sendall(b"Content-Length: 100000000000000000000\r\n\r\n"
                         b'{"jsonrpc": "2.0", "id": 2, "method": "shutdown"}')
            send({"id": 3, "method": "shutdown"})
            assert reply() == {"jsonrpc": "2.0", "id": 2, "error": {"code": -32600, "message": (
                "message too large: Content-Length 100000000000000000000 is over the limit of "
                "67108864 bytes (lsp_server --max-message-mib)")}}
            assert reply() == {"jsonrpc": "2.0", "id": 3, "result": None}
            started = time.monotonic()
            send({"method": "exit"})
            assert proc.wait(30) == 0
            assert time.monotonic() - started < BOUND
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
