"""Tool calls over the real server, with a scripted model: the turns are encoded by
mistral-common and decoded by the local backend's own chat decoder, so the calls go through the
real parser, validator, sandbox, tools and loop. Every refusal is asserted by its message, and
the server keeps serving after each."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.rpc import FAKE_SERVER, RawServer

CHAT = "tramontane/chat"
ANSWER = {"text": "Done."}
Handler = Callable[[dict[str, Any]], Any]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "add.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "README.md").write_text("# Project\n\nAdds numbers.\n")
    (root / ".env").write_text("TOKEN=secret\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (tmp_path / "outside.txt").write_text("not yours\n")
    os.symlink(tmp_path / "outside.txt", root / "link.txt")
    return root


def start(workspace: Path, turns: list[dict[str, Any]], **chat: Any) -> RawServer:
    script = workspace.parent / "script.json"
    script.write_text(json.dumps(turns))
    server = RawServer(FAKE_SERVER, env={"FAKE_CHAT_FILE": str(script)})
    uri = workspace.as_uri()
    msg = server.request("initialize", {
        "processId": None, "rootUri": uri, "capabilities": {"workspace": {"applyEdit": True}},
        "workspaceFolders": [{"uri": uri, "name": "project"}],
        "initializationOptions": {"chat": chat} if chat else None})
    server.response(msg)
    server.notify("initialized", {})
    server.wait_for_status("ready")
    return server


def ask(server: RawServer, chat_id: str, handlers: dict[str, Handler] | None = None,
        **params: Any) -> dict[str, Any]:
    """A chat turn; requests the server makes of the client meanwhile go to `handlers`."""
    params.setdefault("messages", [{"role": "user", "content": "Go."}])
    msg = server.request(CHAT, {"chatId": chat_id, **params})
    deadline = time.monotonic() + 60
    while True:
        frame = server.next_frame(max(0.01, deadline - time.monotonic()))
        if "method" in frame and "id" in frame:  # the server asks the client
            handler = (handlers or {})[frame["method"]]
            server.send({"id": frame["id"], "result": handler(frame["params"])})
        elif "method" in frame:
            server.notifications.append(frame)
        elif frame.get("id") == msg:
            return frame


def tool_results(server: RawServer) -> list[dict[str, Any]]:
    return [n["params"]["toolResult"] for n in server.notifications
            if n.get("method") == "tramontane/chatDelta" and n["params"]["kind"] == "toolResult"]


@pytest.fixture
def run(workspace: Path) -> Iterator[Callable[..., dict[str, Any]]]:
    """`run(call, **chat_settings)`: one turn where the model makes `call` then answers; the
    tool result, after which a plain turn checks that the server still serves."""
    servers: list[RawServer] = []

    def one(name: str, arguments: dict[str, Any], **settings: Any) -> dict[str, Any]:
        server = start(workspace, [{"calls": [{"name": name, "arguments": arguments}]},
                                   ANSWER], **settings)
        servers.append(server)
        reply = ask(server, "t")
        assert reply["result"]["finishReason"] == "stop"
        (result,) = tool_results(server)
        again = ask(server, "after", tools=False)
        assert again["result"]["message"]["content"] == " Done."
        return dict(result)

    yield one
    for server in servers:
        server.close()


def test_a_read_file_call_runs_and_the_model_reads_the_result(workspace: Path) -> None:
    server = start(workspace, [
        {"calls": [{"name": "read_file", "arguments": {"path": "src/add.py"}}]}, ANSWER])
    try:
        reply = ask(server, "c1")
        result = reply["result"]
        deltas = [n["params"] for n in server.notifications
                  if n.get("method") == "tramontane/chatDelta"]
        call = deltas[0]["toolCall"]
        assert deltas[0]["kind"] == "toolCall" and call["name"] == "read_file"
        assert json.loads(call["arguments"]) == {"path": "src/add.py"}
        assert deltas[1] == {"chatId": "c1", "kind": "toolResult", "toolResult": {
            "id": call["id"], "isError": False,
            "content": "src/add.py (2 lines)\n1\tdef add(a, b):\n2\t    return a + b"}}
        assert [d["text"] for d in deltas[2:]] and \
            "".join(d["text"] for d in deltas[2:]) == " Done."  # SentencePiece's space
        assert result["finishReason"] == "stop"
        assert [m["role"] for m in result["messages"]] == ["assistant", "tool", "assistant"]
        assert result["messages"][0]["tool_calls"][0]["id"] == call["id"]
        assert result["messages"][1] == {"role": "tool", "tool_call_id": call["id"],
                                         "name": "read_file",
                                         "content": deltas[1]["toolResult"]["content"]}
        assert result["message"] == {"role": "assistant", "content": " Done."}
    finally:
        server.close()


def test_list_and_search_stay_inside_the_workspace_and_skip_secrets(
        run: Callable[..., dict[str, Any]]) -> None:
    listing = run("list_files", {})
    assert listing["isError"] is False
    assert listing["content"].splitlines() == ["README.md", "link.txt", "src/", "src/add.py"] \
        or ".env" not in listing["content"]
    assert ".env" not in listing["content"] and ".git" not in listing["content"]
    found = run("search_text", {"query": "return"})
    assert found == {"id": found["id"], "isError": False,
                     "content": found["content"]}
    assert "src/add.py:2:     return a + b" in found["content"]
    assert "secret" not in run("search_text", {"query": "TOKEN"})["content"]


@pytest.mark.parametrize(("name", "arguments", "message"), [
    ("read_file", {"path": "/etc/passwd"}, "path \"/etc/passwd\" is outside the workspace"),
    ("read_file", {"path": "../outside.txt"}, "outside the workspace"),
    ("read_file", {"path": "~/.bashrc"}, "'~' (a home directory) is not allowed"),
    ("read_file", {"path": "src/add.py\u0000.txt"}, "contains a NUL byte"),
    ("read_file", {"path": ".env"}, "secret"),
    ("read_file", {"path": ".git/config"}, ".git"),
    ("read_file", {"path": "link.txt"}, "outside the workspace"),
    ("read_file", {"path": 42}, "42 is not of type 'string'"),
    ("read_file", {}, "'path' is a required property"),
    ("no_such_tool", {}, "unknown tool \"no_such_tool\""),
])
def test_refusals_go_back_to_the_model_as_tool_errors(
        run: Callable[..., dict[str, Any]], name: str, arguments: dict[str, Any],
        message: str) -> None:
    result = run(name, arguments)
    assert result["isError"] is True
    assert message in result["content"], result["content"]


def test_denied_paths_from_the_settings_are_refused(run: Callable[..., dict[str, Any]]) -> None:
    result = run("read_file", {"path": "README.md"}, deniedPaths=["*.md"])
    assert result["isError"] is True and "chat.deniedPaths" in result["content"]


def test_a_malformed_call_is_an_error_the_model_reads(workspace: Path) -> None:
    server = start(workspace, [{"raw": '[{"name": "read_file", "arguments": {"path": '},
                               ANSWER])
    try:
        reply = ask(server, "m")
        (result,) = tool_results(server)
        assert result["isError"] is True
        assert result["content"].startswith("your tool call could not be read: ")
        assert reply["result"]["message"]["content"] == " Done."
    finally:
        server.close()


def test_a_flood_of_tool_call_markers_is_bounded(workspace: Path) -> None:
    server = start(workspace, [{"markers": 200_000}, ANSWER])
    try:
        started = time.monotonic()
        reply = ask(server, "flood")
        assert time.monotonic() - started < 60
        (result,) = tool_results(server)
        assert result["isError"] is True and "could not be read" in result["content"]
        assert reply["result"]["finishReason"] == "stop"
    finally:
        server.close()


def test_the_tool_step_limit_ends_the_turn(workspace: Path) -> None:
    call = {"calls": [{"name": "list_files", "arguments": {}}]}
    server = start(workspace, [call, call, call], maxToolSteps=1)
    try:
        result = ask(server, "loop")["result"]
        assert result["finishReason"] == "toolLimit"
        assert [m["role"] for m in result["messages"]] == ["assistant", "tool", "assistant"]
        assert len(tool_results(server)) == 1
    finally:
        server.close()


def test_a_client_tool_runs_in_the_editor(workspace: Path) -> None:
    server = start(workspace, [
        {"calls": [{"name": "diagnostics", "arguments": {"path": "src/add.py"}}]}, ANSWER])
    asked: list[dict[str, Any]] = []

    def run_tool(params: dict[str, Any]) -> dict[str, Any]:
        asked.append(params)
        return {"content": "src/add.py:2: unused variable", "isError": False}

    try:
        ask(server, "client", {"tramontane/runTool": run_tool}, tools=False, clientTools=[
            {"name": "diagnostics", "description": "Problems of a file",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                            "required": ["path"]}}])
        assert asked == [{"chatId": "client", "id": asked[0]["id"], "name": "diagnostics",
                          "arguments": {"path": "src/add.py"}}]
        assert tool_results(server) == [{"id": asked[0]["id"], "isError": False,
                                         "content": "src/add.py:2: unused variable"}]
    finally:
        server.close()


@pytest.mark.parametrize("offered", [["list_files"], True])
def test_a_client_tool_may_take_the_name_of_a_built_in_not_offered(
        workspace: Path, offered: list[str] | bool) -> None:
    """The editor's read_file (e.g. one reading unsaved buffers) runs when the built-in one is
    not offered; when it is, the built-in runs and the editor is not asked."""
    server = start(workspace, [
        {"calls": [{"name": "read_file", "arguments": {"path": "src/add.py"}}]}, ANSWER])
    asked: list[dict[str, Any]] = []

    def run_tool(params: dict[str, Any]) -> dict[str, Any]:
        asked.append(params)
        return {"content": "from the editor's buffer"}

    try:
        ask(server, "shadow", {"tramontane/runTool": run_tool}, tools=offered, clientTools=[
            {"name": "read_file", "description": "Read a buffer of the editor",
             "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                            "required": ["path"]}}])
        [result] = tool_results(server)
        if offered is True:
            assert asked == []
            assert result["isError"] is False and "def add" in result["content"]
        else:
            assert [a["name"] for a in asked] == ["read_file"]
            assert result == {"id": asked[0]["id"], "isError": False,
                              "content": "from the editor's buffer"}
    finally:
        server.close()


@pytest.mark.parametrize("accept", [True, False])
def test_propose_edit_asks_the_editor_and_writes_nothing(workspace: Path, accept: bool) -> None:
    edit = {"path": "src/add.py", "edits": [{"range": {
        "start": {"line": 1, "character": 11}, "end": {"line": 1, "character": 16}},
        "newText": "sum((a, b))"}]}
    server = start(workspace, [{"calls": [{"name": "propose_edit", "arguments": edit}]}, ANSWER])
    seen: list[dict[str, Any]] = []

    def apply(params: dict[str, Any]) -> dict[str, Any]:
        seen.append(params)
        return {"applied": accept}

    try:
        ask(server, "edit", {"workspace/applyEdit": apply})
        (params,) = seen
        uri = (workspace / "src" / "add.py").as_uri()
        assert params["edit"]["documentChanges"] == [{
            "textDocument": {"uri": uri, "version": None},
            "edits": [{"range": edit["edits"][0]["range"], "newText": "sum((a, b))",
                       "annotationId": "tramontane.proposedEdit"}]}]
        assert params["edit"]["changeAnnotations"]["tramontane.proposedEdit"][
            "needsConfirmation"] is True
        (result,) = tool_results(server)
        assert result["content"] == (
            "the user reviewed and applied the 1 edit to src/add.py" if accept else
            "the user declined the 1 edit to src/add.py: the file is unchanged")
        # The server never writes: applying is the editor's job.
        assert (workspace / "src" / "add.py").read_text() == \
            "def add(a, b):\n    return a + b\n"
    finally:
        server.close()
