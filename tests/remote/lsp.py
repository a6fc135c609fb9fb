"""The real language server over stdio (tests.e2e.rpc's raw client), as the remote tests drive
it: settings changed at run time, completions with the status that explains them, chat turns
that answer the server's `tramontane/runTool` requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.rpc import RawServer

DOC = "file:///w/fib.py"
TEXT = ('import os\n\ndef fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    \n\n'
        'class Config:\n    def __init__(self, path):\n        self.path = path\n\n'
        'print(fibonacci(10))\n')


class Server(RawServer):
    def start(self, options: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        """initialize with `options`; the first settled status ("ready" or "error")."""
        self.initialize(options)
        self.first_status = self.settled(timeout)
        return self.first_status

    def settled(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.notifications:
                if frame.get("method") == "tramontane/status" and \
                        frame["params"]["state"] in ("ready", "error"):
                    self.notifications.remove(frame)
                    return frame["params"]  # type: ignore[no-any-return]
            self.notifications.append(self.next_frame(max(0.01, deadline - time.monotonic())))

    def configure(self, options: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """New backend settings at run time; the backend's status once it has applied them."""
        self.settings(options)
        return self.settled(timeout)

    def settings(self, options: dict[str, Any]) -> None:
        """New settings that leave the backend as it is (no status follows)."""
        self.notifications.clear()
        self.notify("workspace/didChangeConfiguration", {"settings": options})

    def open(self, text: str = TEXT, uri: str = DOC) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": text}})

    def inline(self, line: int, character: int, uri: str = DOC) -> int:
        self.notifications.clear()
        return self.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 2}})

    def complete(self, line: int, character: int, uri: str = DOC, timeout: float = 120
                 ) -> tuple[list[str], dict[str, Any]]:
        """The texts of the reply, and the last status sent before it."""
        reply = self.response(self.inline(line, character, uri), timeout)
        items = reply["result"]["items"] if reply.get("result") else []
        return [item["insertText"] for item in items], self.statuses()[-1]

    def statuses(self) -> list[dict[str, Any]]:
        return [n["params"] for n in self.notifications
                if n.get("method") == "tramontane/status"]

    def chat(self, params: dict[str, Any], run_tool: Callable[[dict[str, Any]], Any]
             | None = None, timeout: float = 120) -> dict[str, Any]:
        """One `tramontane/chat` turn; `run_tool(params)` answers each `tramontane/runTool`."""
        self.notifications.clear()
        msg = self.request("tramontane/chat", params)
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.01, deadline - time.monotonic()))
            if "method" not in frame and frame.get("id") == msg:
                return frame
            if frame.get("method") == "tramontane/runTool" and run_tool is not None:
                self.send({"id": frame["id"], "result": run_tool(frame["params"])})
            self.notifications.append(frame)

    def deltas(self) -> list[dict[str, Any]]:
        return [n["params"] for n in self.notifications
                if n.get("method") == "tramontane/chatDelta"]

    def peak_rss_mib(self) -> float:
        """The process' peak resident memory so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc/PID/status")
