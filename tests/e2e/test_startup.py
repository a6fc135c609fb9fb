"""Ready before compiling: with `compile` on, completions run on the eager path as soon as the
weights are loaded, and the compiled decode step is swapped in later, between two requests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.arch import kernels
from tests.e2e.rpc import RawServer
from tests.e2e.test_protocol import inline, open_doc

TEXT = "def add(a, b):\n    return foo()\n\nprint(add(1, 2))\n"


def statuses(server: RawServer) -> list[dict[str, object]]:
    return [n["params"] for n in server.notifications if n.get("method") == "tramontane/status"]


def test_completions_are_served_while_the_decode_step_compiles(tiny_model: Path) -> None:
    """The compiled graph (the native step, which compiles nothing, turned off)."""
    server = RawServer(env={"TRAMONTANE_NATIVE_STEP": "0"})
    try:
        server.initialize({"model": str(tiny_model), "compile": True,
                           "completion": {"maxTokens": 8, "timeBudgetMs": 60000}})
        ready = server.wait_for_status("ready", timeout=120)
        assert ready["fastDecode"] is False
        assert str(ready["message"]).endswith(
            "; compiling the fast decode step (completions run meanwhile)")
        loaded = time.monotonic()
        open_doc(server, TEXT)
        reply = server.response(inline(server, {"line": 2, "character": 0}), timeout=120)
        answered = time.monotonic()
        assert reply["result"]["items"], "the tiny model completes this point"
        # Nothing said the fast path was in use before that reply: it was served eagerly.
        assert all(s.get("fastDecode") is not True for s in statuses(server))
        fast = server.wait_for_status("ready", timeout=600)
        while fast.get("fastDecode") is not True:
            fast = server.wait_for_status("ready", timeout=600)
        assert str(fast["message"]).endswith(", fast decode step in use")
        swapped = time.monotonic()
        assert answered - loaded < swapped - loaded
        # The same completion again, now through the compiled step (reopened: not answered
        # from the completion shown before).
        server.notify("textDocument/didClose", {"textDocument": {"uri": "file:///w/a.py"}})
        open_doc(server, TEXT)
        again = server.response(inline(server, {"line": 2, "character": 0}), timeout=60)
        assert again["result"] == reply["result"]
    finally:
        server.close()


@pytest.mark.skipif(not kernels.available(), reason="the C++ kernels are not built here")
def test_the_native_step_is_swapped_in_and_completes_as_the_eager_path(tiny_model: Path) -> None:
    """With the kernels built, the server's fast step is the native one (its status says so):
    nothing to compile, and its completion is the eager path's, token for token."""
    replies = []
    for compile_ in (False, True):
        server = RawServer()
        try:
            server.initialize({"model": str(tiny_model), "compile": compile_,
                               "completion": {"maxTokens": 8, "timeBudgetMs": 60000}})
            status = server.wait_for_status("ready", timeout=120)
            while compile_ and status.get("fastDecode") is not True:
                status = server.wait_for_status("ready", timeout=120)
            assert status.get("decodeStep") == ("native" if compile_ else None)
            open_doc(server, TEXT)
            replies.append(server.response(inline(server, {"line": 2, "character": 0}),
                                           timeout=120)["result"])
        finally:
            server.close()
    assert replies[0]["items"] and replies[1] == replies[0]
