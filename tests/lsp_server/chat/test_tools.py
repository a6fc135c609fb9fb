"""The built-in tools' specs, their selection, argument validation, the output cap, and
`run_tool`'s own guarantees (time limit, errors as results, the event loop kept free)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, Tool
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine.checkpoints.tiny import tokenizer_source
from lsp_server.backends.base import ToolSpec
from lsp_server.chat import tools
from lsp_server.chat.errors import ToolError
from lsp_server.chat.sandbox import Workspace
from lsp_server.chat.tools import (
    BUILTIN_TOOLS,
    ToolResult,
    cap_output,
    run_tool,
    select_tools,
    validate_arguments,
)

READ = BUILTIN_TOOLS["read_file"]
EDIT = BUILTIN_TOOLS["propose_edit"]
READ_SIGNATURE = "{path: string, startLine?: integer, endLine?: integer}"


# --- Specs and selection ---------------------------------------------------------------------


def test_the_builtin_tools_have_their_fixed_names_and_parameters() -> None:
    shapes = {name: (list(spec.parameters["properties"]), spec.parameters["required"])
              for name, spec in BUILTIN_TOOLS.items()}
    assert shapes == {
        "read_file": (["path", "startLine", "endLine"], ["path"]),
        "list_files": (["path", "glob"], []),
        "search_text": (["query", "path", "regex"], ["query"]),
        "propose_edit": (["path", "edits"], ["path", "edits"]),
    }
    edit_item = EDIT.parameters["properties"]["edits"]["items"]
    assert list(edit_item["properties"]) == ["range", "newText"]
    assert list(edit_item["properties"]["range"]["properties"]) == ["start", "end"]
    assert list(edit_item["properties"]["range"]["properties"]["start"]["properties"]) == [
        "line", "character"]
    for spec in BUILTIN_TOOLS.values():
        Draft202012Validator.check_schema(spec.parameters)
        assert spec.parameters["additionalProperties"] is False


def test_mistral_common_encodes_the_builtin_tools_into_a_prompt() -> None:
    tokenizer = MistralTokenizer.from_file(str(tokenizer_source("v7")))
    request = ChatCompletionRequest(
        messages=[UserMessage(content="hi")],
        tools=[Tool(function=Function(name=s.name, description=s.description,
                                      parameters=s.parameters)) for s in select_tools(True)])
    text = tokenizer.decode(tokenizer.encode_chat_completion(request).tokens,
                            special_token_policy=SpecialTokenPolicy.KEEP)
    for name in BUILTIN_TOOLS:
        assert f'"name":▁"{name}"' in text


def test_select_tools_offers_all_none_or_the_named_ones_in_canonical_order() -> None:
    every = ["read_file", "list_files", "search_text", "propose_edit"]
    assert [s.name for s in select_tools(True)] == every
    assert [s.name for s in select_tools(None)] == every
    assert select_tools(False) == []
    assert [s.name for s in select_tools(["search_text", "read_file", "read_file"])] == [
        "read_file", "search_text"]
    assert select_tools([]) == []


def test_select_tools_names_the_unknown_tools() -> None:
    with pytest.raises(ToolError) as caught:
        select_tools(["read_file", "rm", "curl"])
    assert str(caught.value) == (
        'unknown tools in `tools`: "rm", "curl"; the built-in tools are read_file, list_files, '
        "search_text, propose_edit")
    with pytest.raises(ToolError) as caught:
        select_tools(["fetch"])
    assert str(caught.value).startswith('unknown tool in `tools`: "fetch";')


# --- Argument validation ---------------------------------------------------------------------


def invalid(spec: ToolSpec, arguments_json: str) -> str:
    result = validate_arguments(spec, arguments_json)
    assert isinstance(result, ToolError), result
    return str(result)


def test_valid_arguments_come_back_decoded() -> None:
    assert validate_arguments(READ, '{"path": "a.py", "startLine": 2}') == {
        "path": "a.py", "startLine": 2}
    assert validate_arguments(BUILTIN_TOOLS["list_files"], "") == {}
    assert validate_arguments(BUILTIN_TOOLS["list_files"], "  ") == {}
    # JSON Schema counts 2.0 as an integer; the tools convert it.
    assert validate_arguments(READ, '{"path": "a.py", "startLine": 2.0}') == {
        "path": "a.py", "startLine": 2.0}


def test_bad_json_is_reported_with_where_it_broke() -> None:
    assert invalid(READ, '{"path": "a.py"') == (
        "read_file: the arguments are not valid JSON (Expecting ',' delimiter at line 1 "
        "column 16)")
    assert invalid(READ, "{'path': 'a.py'}") == (
        "read_file: the arguments are not valid JSON (Expecting property name enclosed in "
        "double quotes at line 1 column 2)")


def test_arguments_that_are_not_an_object_are_refused() -> None:
    assert invalid(READ, '["a.py"]') == (
        f"read_file: the arguments must be a JSON object {READ_SIGNATURE}, not a list")
    assert invalid(READ, '"a.py"') == (
        f"read_file: the arguments must be a JSON object {READ_SIGNATURE}, not a string")
    assert invalid(READ, "null") == (
        f"read_file: the arguments must be a JSON object {READ_SIGNATURE}, not null")
    assert invalid(READ, "3") == (
        f"read_file: the arguments must be a JSON object {READ_SIGNATURE}, not a number")


def test_a_wrong_type_is_named_with_its_parameter() -> None:
    assert invalid(READ, '{"path": "a.py", "startLine": "3"}') == (
        f"read_file: invalid arguments: startLine: '3' is not of type 'integer'. Expected "
        f"{READ_SIGNATURE}")
    assert invalid(READ, '{"path": "a.py", "startLine": true}') == (
        f"read_file: invalid arguments: startLine: True is not of type 'integer'. Expected "
        f"{READ_SIGNATURE}")


def test_a_missing_required_parameter_is_named() -> None:
    assert invalid(READ, "{}") == (
        f"read_file: invalid arguments: 'path' is a required property. Expected {READ_SIGNATURE}")


def test_extra_properties_are_refused() -> None:
    assert invalid(READ, '{"path": "a.py", "mode": "w"}') == (
        "read_file: invalid arguments: Additional properties are not allowed ('mode' was "
        f"unexpected). Expected {READ_SIGNATURE}")


def test_nested_problems_say_where_they_are() -> None:
    arguments = {"path": "a.py", "edits": [{"range": {"start": {"line": -1, "character": 0},
                                                      "end": {"line": 0}}, "newText": "x"}]}
    message = invalid(EDIT, json.dumps(arguments))
    assert message == (
        "propose_edit: invalid arguments: edits[0].range.start.line: -1 is less than the "
        "minimum of 0; edits[0].range.end: 'character' is a required property. Expected "
        "{path: string, edits: array}")
    assert invalid(EDIT, '{"path": "a.py", "edits": []}') == (
        "propose_edit: invalid arguments: edits: [] should be non-empty. Expected "
        "{path: string, edits: array}")


def test_many_problems_are_counted_not_listed() -> None:
    message = invalid(READ, '{"startLine": "a", "endLine": "b", "x": 1, "y": 2}')
    assert message.count(";") == 3
    assert message.endswith(f"; 1 more problem. Expected {READ_SIGNATURE}")


def test_a_huge_value_is_cut_in_the_message() -> None:
    message = invalid(READ, json.dumps({"path": ["x" * 5000]}))
    assert len(message) < 400
    assert message.startswith("read_file: invalid arguments: path: ['xxx")
    assert "…. Expected" in message


def test_deeply_nested_arguments_are_refused_not_crashed() -> None:
    assert invalid(READ, "[" * 100_000 + "]" * 100_000) == (
        "read_file: the arguments are nested too deeply")
    assert invalid(READ, '{"path": ' + "[" * 100_000) == (
        "read_file: the arguments are nested too deeply")


def test_a_number_too_long_to_read_is_refused() -> None:
    assert invalid(READ, '{"path": "a", "startLine": ' + "9" * 5000 + "}") == (
        "read_file: the arguments hold a number too long to read")


def test_an_invalid_schema_from_a_client_tool_is_reported() -> None:
    broken = ToolSpec("client_tool", "", {"type": "object", "properties": {"a": {"type": 3}}})
    assert invalid(broken, "{}").startswith(
        "client_tool: the tool's parameter schema is invalid (3 is not valid under any of the "
        "given schemas")


def test_client_schema_patterns_are_matched_with_a_time_limit() -> None:
    spec = ToolSpec("client_tool", "", {"type": "object",
                                        "properties": {"name": {"type": "string",
                                                                "pattern": "^(a+)+$"}}})
    assert validate_arguments(spec, '{"name": "aaa"}') == {"name": "aaa"}
    assert invalid(spec, '{"name": "abc"}') == (
        "client_tool: invalid arguments: name: 'abc' does not match '^(a+)+$'. Expected "
        "{name?: string}")
    began = time.monotonic()
    assert invalid(spec, json.dumps({"name": "a" * 50_000 + "!"})) == (
        "client_tool: invalid arguments: name: matching the schema's pattern '^(a+)+$' took too "
        "long. Expected {name?: string}")
    assert time.monotonic() - began < 5  # jsonschema's own `re` would never return


def test_a_schema_reference_is_never_fetched() -> None:
    spec = ToolSpec("client_tool", "", {"type": "object", "properties": {
        "a": {"$ref": "http://127.0.0.1:9/schema.json"}}})
    assert invalid(spec, '{"a": 1}') == (
        'client_tool: the tool\'s parameter schema refers to "http://127.0.0.1:9/schema.json", '
        "which cannot be resolved")


# --- The output cap --------------------------------------------------------------------------


def test_output_under_the_cap_is_unchanged() -> None:
    assert cap_output("abc", 3) == "abc"


def test_truncated_output_ends_at_a_line_and_says_how_much_was_cut() -> None:
    text = "\n".join(f"line {i:03}" for i in range(100))  # 100 lines of 8 characters
    capped = cap_output(text, 200)
    assert len(capped) <= 200
    # The notice takes 52 characters, leaving 148: 16 whole lines (143 characters).
    kept = capped[:capped.index("\n[output")]
    assert text.startswith(kept) and kept.endswith("\nline 015") and len(kept) == 143
    assert capped == kept + f"\n[output truncated: {len(text) - len(kept)} of {len(text)} " \
                            "characters not shown]"


def test_a_cap_too_small_for_the_notice_just_cuts() -> None:
    assert cap_output("x" * 100, 10) == "x" * 10


# --- run_tool --------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    (tmp_path / "a.py").write_text("".join(f"print({i})\n" for i in range(1, 2001)))
    return Workspace([tmp_path])


def run(name: str, arguments: dict[str, Any], workspace: Workspace, *, timeout_s: float = 10.0,
        output_chars: int = 20_000) -> ToolResult:
    return asyncio.run(run_tool(name, arguments, workspace, timeout_s=timeout_s,
                                output_chars=output_chars))


def test_an_unknown_tool_is_an_error_result(workspace: Workspace) -> None:
    assert run("delete_file", {"path": "a.py"}, workspace) == ToolResult(
        'unknown tool "delete_file"; the tools are read_file, list_files, search_text, '
        "propose_edit", True)


def test_run_tool_checks_the_arguments_itself(workspace: Workspace) -> None:
    assert run("read_file", {"path": 3}, workspace) == ToolResult(
        f"read_file: invalid arguments: path: 3 is not of type 'string'. Expected "
        f"{READ_SIGNATURE}", True)


def test_sandbox_refusals_come_back_as_error_results(workspace: Workspace) -> None:
    assert run("read_file", {"path": "/etc/passwd"}, workspace) == ToolResult(
        'path "/etc/passwd" is outside the workspace folders', True)


def test_long_results_are_capped_with_the_truncation_line(workspace: Workspace) -> None:
    result = run("read_file", {"path": "a.py"}, workspace, output_chars=300)
    assert not result.is_error
    assert len(result.content) <= 300
    assert result.content.startswith("a.py (2000 lines)\n   1\tprint(1)\n")
    assert result.content.endswith(" characters not shown]")
    assert "\n[output truncated: " in result.content


def test_a_tool_past_its_time_limit_is_abandoned_with_an_error(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    def stuck(*args: object) -> str:
        time.sleep(3)
        return "too late"

    monkeypatch.setattr(tools.filetools, "read_file", stuck)
    began = time.monotonic()
    result = run("read_file", {"path": "a.py"}, workspace, timeout_s=0.2)
    assert result == ToolResult("read_file timed out after 0.2 s and was abandoned; ask for "
                                "less (a smaller path, a narrower query)", True)
    assert time.monotonic() - began < 2.5  # the 3 s of work were not waited for


def test_an_unexpected_os_error_names_no_path(workspace: Workspace,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object) -> str:
        raise PermissionError(13, "Permission denied", "/home/someone/a.py")

    monkeypatch.setattr(tools.filetools, "list_files", denied)
    assert run("list_files", {}, workspace) == ToolResult(
        "list_files failed: Permission denied", True)


@pytest.mark.asyncio
async def test_the_event_loop_keeps_running_while_a_regex_backtracks(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("a" * 50_000 + "!\n")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    began = time.monotonic()
    result = await run_tool("search_text", {"query": "(a+)+$", "regex": True},
                            Workspace([tmp_path]), timeout_s=2.0, output_chars=20_000)
    elapsed = time.monotonic() - began
    ticker.cancel()
    assert result.content in (
        "no matches for \"(a+)+$\" in . (1 file searched)\n[the search ran out of time on "
        "big.txt:1 (a regular expression that backtracks too much?); the results are "
        "incomplete]",
        "search_text timed out after 2 s and was abandoned; ask for less (a smaller path, a "
        "narrower query)")
    # The event loop ran about every 10 ms throughout (stdlib re would have held the GIL).
    assert ticks > elapsed / 0.01 / 4
