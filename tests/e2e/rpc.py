"""A raw JSON-RPC client over a subprocess' stdio: sends exactly the bytes a test wants
(malformed ones included) and reads back every frame, so a test can check that stdout carries
nothing but well-formed JSON-RPC."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

SERVER = [sys.executable, "-m", "lsp_server", "--stdio", "--log-level", "INFO"]


FAKE_SERVER = [sys.executable, "-m", "tests.e2e.fake_server"]


class RawServer:
    def __init__(self, command: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> None:
        self.proc = subprocess.Popen(
            command or SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.notifications: list[dict[str, Any]] = []
        self.frames: queue.Queue[dict[str, Any]] = queue.Queue()
        self.garbage: list[bytes] = []  # anything on stdout that is not a frame
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self._next_id = 0

    def _read_stdout(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            line = out.readline()
            if not line:
                return
            if not line.startswith(b"Content-Length: "):
                self.garbage.append(line)
                continue
            length = int(line.split(b":")[1])
            while (header := out.readline()) not in (b"\r\n", b""):
                if not header.startswith(b"Content-Type: "):
                    self.garbage.append(header)
            body = out.read(length)
            try:
                self.frames.put(json.loads(body))
            except ValueError:
                self.garbage.append(body)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def send_bytes(self, body: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(json.dumps({"jsonrpc": "2.0", **message}).encode())

    def request(self, method: str, params: Any = None) -> int:
        self._next_id += 1
        self.send({"id": self._next_id, "method": method, "params": params})
        return self._next_id

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"method": method, "params": params})

    def next_frame(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.frames.get(timeout=timeout)

    def response(self, msg_id: int | str | None, timeout: float = 30.0) -> dict[str, Any]:
        """The reply to `msg_id`, skipping notifications (kept in `self.notifications`, with
        the replies to other requests, which may come first: they are looked for there too)."""
        for frame in self.notifications:
            if "method" not in frame and frame.get("id") == msg_id:
                self.notifications.remove(frame)
                return frame
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.01, deadline - time.monotonic()))
            if "method" not in frame and frame.get("id") == msg_id:
                return frame
            self.notifications.append(frame)

    def wait_for_status(self, state: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.notifications:
                if frame.get("method") == "tramontane/status" and \
                        frame["params"]["state"] == state:
                    self.notifications.remove(frame)
                    return frame["params"]  # type: ignore[no-any-return]
            self.notifications.append(self.next_frame(max(0.01, deadline - time.monotonic())))

    def wait_for_stderr(self, text: str, timeout: float = 30.0) -> None:
        """Until a line of stderr holds `text` (a thread reads stderr: a line the server wrote
        before its reply may not be read yet when the reply is)."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            assert time.monotonic() < deadline, f"{text!r} never logged"
            time.sleep(0.01)

    def initialize(self, options: Any = None, capabilities: Any = None) -> dict[str, Any]:
        msg = self.request("initialize", {"processId": None, "rootUri": None,
                                          "capabilities": capabilities or {},
                                          "initializationOptions": options})
        reply = self.response(msg)
        self.notify("initialized", {})
        return reply

    def close(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode
