"""Typing over stdio: the prefix cache serves each keystroke's prompt (status counters show it),
a closed document's cache is freed, and typing the shown completion's beginning is answered
from it without running the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.arch import kernels
from tests.e2e.rpc import FAKE_SERVER, RawServer
from tests.e2e.test_protocol import backend_log, inline, open_doc

DOC = "file:///w/a.py"
TEXT = "def add(a, b):\n    return foo()\n\nprint(add(1, 2))\n"


def type_at(server: RawServer, version: int, line: int, character: int, text: str,
            uri: str = DOC) -> None:
    pos = {"line": line, "character": character}
    server.notify("textDocument/didChange", {
        "textDocument": {"uri": uri, "version": version},
        "contentChanges": [{"range": {"start": pos, "end": pos}, "text": text}]})


def completed(server: RawServer, msg: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reply to `msg` and the `ready` status sent with it."""
    reply = server.response(msg, timeout=60)
    return reply, server.wait_for_status("ready")


def test_each_keystroke_prefills_only_what_it_added(tiny_model: Path) -> None:
    server = RawServer(env={})
    try:
        server.initialize({"model": str(tiny_model), "compile": False,
                           "completion": {"maxTokens": 4}})
        server.wait_for_status("ready")
        open_doc(server, TEXT)
        line, col = 2, 0  # the empty line after `return foo()`
        _, first = completed(server, inline(server, {"line": line, "character": col}))
        assert first["reusedTokens"] == 0
        assert first["prefilledTokens"] == first["promptTokens"] > 20
        counters = []
        for version, char in enumerate("total = add(", start=2):
            type_at(server, version, line, col, char)
            col += 1
            _, status = completed(server, inline(server, {"line": line, "character": col}))
            if "reusedTokens" in status:  # not typed through
                counters.append(status)
        assert len(counters) >= 8
        for status in counters:
            # The prompt grew at its end: everything before the last couple of tokens (which
            # the new character may merge with) is reused.
            assert status["prefilledTokens"] <= 4, status
            assert status["reusedTokens"] == status["promptTokens"] - status["prefilledTokens"]
        # Closing frees the document's cache: reopened, it is prefilled in full.
        server.notify("textDocument/didClose", {"textDocument": {"uri": DOC}})
        open_doc(server, TEXT)
        _, again = completed(server, inline(server, {"line": 2, "character": 0}))
        assert again["reusedTokens"] == 0
        assert again["prefilledTokens"] == first["promptTokens"]
    finally:
        server.close()


def test_typing_the_shown_completion_is_answered_without_the_model(tmp_path: Path) -> None:
    server = RawServer(FAKE_SERVER, env={"FAKE_TOKENS": json.dumps(["ab", "cd", "ef"]),
                                         "FAKE_LOG": str(tmp_path / "backend.log")})
    try:
        server.initialize()
        server.wait_for_status("ready")
        open_doc(server, TEXT)
        cursor = {"line": 2, "character": 0}
        reply, _ = completed(server, inline(server, cursor))
        assert reply["result"]["items"][0]["insertText"] == "abcdef"
        type_at(server, 2, 2, 0, "ab")
        reply, status = completed(server, inline(server, {"line": 2, "character": 2}))
        assert reply["result"]["items"][0]["insertText"] == "cdef"
        assert status["typedThrough"] is True
        type_at(server, 3, 2, 2, "c")
        reply, _ = completed(server, inline(server, {"line": 2, "character": 3}))
        assert reply["result"]["items"][0]["insertText"] == "def"
        assert len(backend_log(tmp_path)) == 1  # the model ran once
        # Something else typed: the model runs again.
        type_at(server, 4, 2, 3, "X")
        reply, _ = completed(server, inline(server, {"line": 2, "character": 4}))
        assert reply["result"]["items"][0]["insertText"] == "abcdef"
        assert len(backend_log(tmp_path)) == 2
    finally:
        server.close()


@pytest.mark.skipif(not kernels.available(), reason="the C++ kernels are not built here")
def test_lookup_drafts_a_completion_from_the_documents_earlier_ones(tiny_model: Path) -> None:
    """`completion.lookup`: back at a cursor completed before, the earlier completion (kept with
    the document's prefix cache) is the draft, checked in one native pass; the completion is the
    same, and the status counts the drafted and accepted tokens."""
    server = RawServer()
    try:
        server.initialize({"model": str(tiny_model), "compile": True,
                           "completion": {"maxTokens": 8, "timeBudgetMs": 60000, "lookup": 8}})
        status = server.wait_for_status("ready", timeout=120)
        while status.get("fastDecode") is not True:
            status = server.wait_for_status("ready", timeout=120)
        open_doc(server, TEXT)
        here, there = {"line": 2, "character": 0}, {"line": 3, "character": 0}
        first, first_status = completed(server, inline(server, here))
        assert first["result"]["items"], "the tiny model completes this point"
        completed(server, inline(server, there))  # the completion shown moves away
        again, again_status = completed(server, inline(server, here))
        assert "typedThrough" not in again_status  # the model ran
        assert again["result"] == first["result"]
        assert first_status["draftedTokens"] == first_status["acceptedTokens"] == 0, first_status
        assert again_status["generatedTokens"] == first_status["generatedTokens"]
        # Tokens after the first came from drafts, a pass over the weights saved for each (the
        # first comes from the prefill; drafts start at 2 tokens and grow as they are accepted).
        assert 2 <= again_status["acceptedTokens"] < again_status["generatedTokens"]
        assert again_status["draftedTokens"] >= again_status["acceptedTokens"]
    finally:
        server.close()
