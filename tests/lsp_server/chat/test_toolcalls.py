"""Tool calls parsed from generated tokens, in each tokenizer version's own format: the token
sequences come from mistral-common encoding assistant turns, and mistral-common's own parser
is the reference. Plus the bounds: hostile outputs cost linear time and bounded memory."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mistral_common.experimental.tools import _decode_tool_calls
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from engine.checkpoints.tiny import tokenizer_source
from lsp_server.backends.base import ToolCall
from lsp_server.chat.errors import ToolCallError
from lsp_server.chat.toolcalls import (
    MAX_CALL_CHARS,
    MAX_CALLS,
    ToolCallDecoder,
    new_call_id,
    tool_calls_from_openai,
)
from lsp_server.chat.tools import BUILTIN_TOOLS, validate_arguments

TOOLS = [Tool(function=Function(name=s.name, description=s.description, parameters=s.parameters))
         for s in BUILTIN_TOOLS.values()]
CALLS = [("read_file", {"path": "a.py"}, "abc123XYZ"),
         ("search_text", {"query": "é😀 \"quoted\"", "regex": False}, "def456UVW")]


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., MistralTokenizer]:
    """`tokenizers(name, mode=test)`: the tokenizers mistral-common ships ("v1", "v2", "v3", "v7",
    "tekken" = Tekken 240911, a v3), and "v11"/"v13": Tekken 240911's vocabulary in a file
    declaring that version, with [ARGS] and [CALL_ID] among its control tokens (mistral-common
    ships no such file; the ranks chosen here do not matter, the parser asks the tokenizer)."""
    folder = tmp_path_factory.mktemp("tokenizers")
    loaded: dict[tuple[str, ValidationMode], MistralTokenizer] = {}

    def get(name: str, mode: ValidationMode = ValidationMode.test) -> MistralTokenizer:
        if (name, mode) not in loaded:
            if name in ("v11", "v13"):
                data = json.loads(tokenizer_source("tekken").read_text())
                specials = [{"rank": t["rank"], "token_str": str(t["token_str"]),
                             "is_control": True} for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
                specials += [{"rank": i, "token_str": f"<SPECIAL_{i}>", "is_control": True}
                             for i in range(20, 32)]
                specials += [{"rank": 32, "token_str": "[ARGS]", "is_control": True},
                             {"rank": 33, "token_str": "[CALL_ID]", "is_control": True}]
                data["config"]["version"] = name
                data["special_tokens"] = specials
                del data["image"]
                path = folder / f"tekken_{name}.json"
                path.write_text(json.dumps(data))
            else:
                path = tokenizer_source(name)
            loaded[name, mode] = MistralTokenizer.from_file(str(path), mode)
        return loaded[name, mode]

    return get


def ids(*values: str) -> Callable[[], str]:
    supply = iter(values)
    return lambda: next(supply)


def assistant_tokens(tokenizer: MistralTokenizer, message: AssistantMessage,
                     finetuning: MistralTokenizer | None = None) -> list[int]:
    """The tokens of `message` as the model produces them: the conversation encoded with and
    without it, minus the common prompt, up to (without) its EOS. A call without an id ("null")
    is only valid as the last message of a fine-tuning sample: pass the `finetuning` tokenizer
    to encode it (with no tool results after it)."""
    user = UserMessage(content="Look at a.py")
    prompt = tokenizer.encode_chat_completion(
        ChatCompletionRequest(messages=[user], tools=TOOLS)).tokens
    results = [ToolMessage(content="ok", tool_call_id=c.id, name=c.function.name)
               for c in message.tool_calls or []
               if tokenizer.instruct_tokenizer.tokenizer.version < TokenizerVersion.v11
               or c.id != "null"]
    full = (finetuning or tokenizer).encode_chat_completion(
        ChatCompletionRequest(messages=[user, message, *results], tools=TOOLS)).tokens
    assert full[:len(prompt)] == prompt
    rest = full[len(prompt):]
    return rest[:rest.index(tokenizer.instruct_tokenizer.tokenizer.eos_id)]


def calls_message(version: str, with_ids: bool, content: str | None = None) -> AssistantMessage:
    # v2 takes one tool result per turn; v11 refuses two calls without ids (both "null").
    calls = CALLS[:1] if version == "v2" or (version == "v11" and not with_ids) else CALLS
    return AssistantMessage(content=content, tool_calls=[
        MistralToolCall(id=call_id if with_ids else "null",
                        function=FunctionCall(name=name, arguments=json.dumps(arguments)))
        for name, arguments, call_id in calls])


def decode(tokenizer: MistralTokenizer, tokens: list[int], **options: Any
           ) -> tuple[str, list[ToolCall] | ToolCallError]:
    decoder = ToolCallDecoder(tokenizer, **options)
    text = "".join(decoder.feed(token) for token in tokens) + decoder.flush()
    return text, decoder.finish()


# --- Each version's format, against mistral-common -----------------------------------------


@pytest.mark.parametrize(("version", "with_ids", "kept"), [
    ("v2", False, False),  # v2 encodes no ids
    ("v3", True, True),
    ("v7", True, True),
    ("tekken", True, True),
    ("v11", True, True),  # name[CALL_ID]id[ARGS]{...}
    ("v11", False, False),  # name[ARGS]{...}
    ("v13", True, False),  # name[ARGS]{...}: ids are not in the tokens
])
def test_calls_encoded_by_mistral_common_parse_back(
        tokenizers: Callable[..., MistralTokenizer], version: str, with_ids: bool,
        kept: bool) -> None:
    tokenizer = tokenizers(version)
    message = calls_message(version, with_ids)
    finetuning = None if with_ids or version == "v2" else tokenizers(
        version, ValidationMode.finetuning)
    tokens = assistant_tokens(tokenizer, message, finetuning)
    fresh = ["fresh0001", "fresh0002"]
    text, calls = decode(tokenizer, tokens, new_id=ids(*fresh))
    assert text == ""
    expected = [ToolCall(call_id if kept else fresh[n], name,
                         json.dumps(arguments, ensure_ascii=False))
                for n, (name, arguments, call_id) in enumerate(CALLS[:len(message.tool_calls or
                                                                            [])])]
    assert calls == expected
    # mistral-common's parser (the reference) reads the same calls.
    raw = tokenizer.instruct_tokenizer.tokenizer
    marker = raw.get_special_token("[TOOL_CALLS]")
    starts = [i for i, token in enumerate(tokens) if token == marker]
    segments = [tokens[a:b] for a, b in zip(starts, [*starts[1:], len(tokens)], strict=True)]
    reference = _decode_tool_calls(segments, raw)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reference] == [
        (c.name, json.loads(c.arguments)) for c in expected]
    if kept:
        assert [c.id for c in reference] == [c.id for c in expected]
    # Encoding the parsed calls again gives back the very tokens generated (the next turn's
    # prompt reuses them from the prefix cache).
    again = AssistantMessage(tool_calls=[
        MistralToolCall(id=c.id if with_ids or version == "v13" else "null",
                        function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls])
    assert assistant_tokens(tokenizer, again, finetuning) == tokens


def test_text_before_the_calls_streams_and_the_calls_follow(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    tokenizer = tokenizers("v7")  # v7 encodes content and tool calls in one turn
    tokens = assistant_tokens(tokenizer, calls_message("v7", True, content="Let me look 🦜."))
    decoder = ToolCallDecoder(tokenizer)
    deltas = []
    for token in tokens:
        deltas.append(decoder.feed(token))
        if decoder.in_tool_calls:
            break
    assert "".join(deltas) == " Let me look 🦜."  # SentencePiece's leading space, as TextStream
    assert all("\ufffd" not in delta for delta in deltas)
    rest = tokens[len(deltas):]
    assert [decoder.feed(token) for token in rest] == [""] * len(rest)
    assert decoder.flush() == ""
    calls = decoder.finish()
    assert isinstance(calls, list) and [c.name for c in calls] == ["read_file", "search_text"]


@pytest.mark.parametrize("version", ["v1", "v3", "v7", "tekken", "v13"])
def test_a_plain_answer_is_all_text_utf8_safe(tokenizers: Callable[..., MistralTokenizer],
                                             version: str) -> None:
    tokenizer = tokenizers(version)
    answer = "Voilà: 𝔘 and 🦜, [TOOL_CALLS] written as text is text."
    raw = tokenizer.instruct_tokenizer.tokenizer
    tokens = raw.encode(answer, bos=False, eos=False)
    decoder = ToolCallDecoder(tokenizer)
    deltas = [decoder.feed(token) for token in tokens]
    assert all("\ufffd" not in delta for delta in deltas)  # bytes of 𝔘 and 🦜 held back
    text = "".join(deltas) + decoder.flush()
    assert text.lstrip(" ") == answer
    assert not decoder.in_tool_calls
    assert decoder.finish() == []


def test_ids_from_the_model_are_kept_only_when_valid_and_unique(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    tokenizer = tokenizers("tekken")
    body = json.dumps([{"name": "read_file", "arguments": {"path": "a"}, "id": "same12345"},
                       {"name": "read_file", "arguments": {"path": "b"}, "id": "same12345"},
                       {"name": "read_file", "arguments": {"path": "c"}, "id": "short"},
                       {"name": "read_file", "arguments": {"path": "d"}}])
    _, calls = decode(tokenizer, json_call_tokens(tokenizer, body),
                      new_id=ids("new000001", "new000002", "new000003"))
    assert isinstance(calls, list)
    assert [c.id for c in calls] == ["same12345", "new000001", "new000002", "new000003"]


def test_generated_ids_are_nine_letters_and_digits() -> None:
    made = {new_call_id() for _ in range(200)}
    assert len(made) == 200
    assert all(len(i) == 9 and i.isascii() and i.isalnum() for i in made)


# --- Lenient forms and errors, JSON-list versions -------------------------------------------


def json_call_tokens(tokenizer: MistralTokenizer, body: str) -> list[int]:
    raw = tokenizer.instruct_tokenizer.tokenizer
    return [raw.get_special_token("[TOOL_CALLS]"), *raw.encode(body, bos=False, eos=False)]


def json_calls(tokenizer: MistralTokenizer, body: str) -> list[ToolCall] | ToolCallError:
    return decode(tokenizer, json_call_tokens(tokenizer, body), new_id=ids("generated"))[1]


def test_a_single_object_and_string_arguments_are_accepted(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    tokenizer = tokenizers("v3")
    assert json_calls(tokenizer, '{"name": "list_files", "arguments": "{\\"glob\\": \\"*\\"}"}') \
        == [ToolCall("generated", "list_files", '{"glob": "*"}')]
    assert json_calls(tokenizer, '[{"name": "list_files"}]') == [
        ToolCall("generated", "list_files", "{}")]


@pytest.mark.parametrize(("body", "message"), [
    ('[{"name": "read_file", "arguments": {', "the tool calls are not valid JSON (Expecting "
                                              "property name enclosed in double quotes at "
                                              "character 37)"),
    ('[{"name": "read_file"}] and more', "the tool calls are not valid JSON (Extra data at "
                                         "character 24)"),
    ('["read_file"]', "tool call 1 is not a JSON object with a name and arguments"),
    ('[{"name": "read file!", "arguments": {}}]',
     'tool call 1: "read file!" is not a valid tool name (letters, digits, _ and -, at most 64)'),
    ('[{"arguments": {}}]',
     "tool call 1: None is not a valid tool name (letters, digits, _ and -, at most 64)"),
    ("   ", "[TOOL_CALLS] is followed by no tool call"),
    ('[{"name": "a", "arguments": {"n": ' + "9" * 5000 + "}}]",
     "the tool calls hold a number too long to read"),
])
def test_malformed_json_calls_are_errors(tokenizers: Callable[..., MistralTokenizer],
                                         body: str, message: str) -> None:
    result = json_calls(tokenizers("tekken"), body)
    assert isinstance(result, ToolCallError) and str(result) == message


def test_too_many_calls_in_one_list_is_an_error(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    body = json.dumps([{"name": "list_files", "arguments": {}}] * (MAX_CALLS + 1))
    result = json_calls(tokenizers("v3"), body)
    assert isinstance(result, ToolCallError)
    assert str(result) == f"the answer has more than {MAX_CALLS} tool calls"


# --- Errors, [ARGS] versions --------------------------------------------------------------------


def named_tokens(tokenizer: MistralTokenizer, *parts: str) -> list[int]:
    """Tokens of `parts`, where "[TOOL_CALLS]", "[ARGS]" and "[CALL_ID]" are control tokens."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    tokens: list[int] = []
    for part in parts:
        if part in ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"):
            tokens.append(raw.get_special_token(part))
        else:
            tokens += raw.encode(part, bos=False, eos=False)
    return tokens


@pytest.mark.parametrize(("version", "parts", "message"), [
    ("v13", ["[TOOL_CALLS]", "read_file"], "tool call 1 (read_file) has no [ARGS]"),
    ("v13", ["[TOOL_CALLS]", "read_file", "[ARGS]", "{}", "[ARGS]", "{}"],
     "tool call 1: [ARGS] appears twice"),
    ("v11", ["[TOOL_CALLS]", "read_file", "[ARGS]", "{}", "[CALL_ID]", "abc123XYZ"],
     "tool call 1: [CALL_ID] comes after [ARGS]"),
    ("v13", ["[TOOL_CALLS]", "list_files", "[ARGS]", "{}", "[TOOL_CALLS]", "rm -rf", "[ARGS]",
             "{}"],
     'tool call 2: "rm -rf" is not a valid tool name (letters, digits, _ and -, at most 64)'),
])
def test_malformed_named_calls_are_errors(tokenizers: Callable[..., MistralTokenizer],
                                          version: str, parts: list[str], message: str) -> None:
    _, result = decode(tokenizers(version), named_tokens(tokenizers(version), *parts))
    assert isinstance(result, ToolCallError) and str(result) == message


def test_bad_arguments_of_one_call_are_left_to_validation(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    tokenizer = tokenizers("v13")
    _, calls = decode(tokenizer, named_tokens(
        tokenizer, "[TOOL_CALLS]", "read_file", "[ARGS]", '{"path": ', "[TOOL_CALLS]",
        "list_files", "[ARGS]", "{}"), new_id=ids("id0000001", "id0000002"))
    assert calls == [ToolCall("id0000001", "read_file", '{"path":'),
                     ToolCall("id0000002", "list_files", "{}")]
    assert str(validate_arguments(BUILTIN_TOOLS["read_file"], calls[0].arguments)) == (
        "read_file: the arguments are not valid JSON (Expecting value at line 1 column 9)")


# --- Hostile outputs: linear time, bounded memory ----------------------------------------------


def measure(tokenizer: MistralTokenizer, tokens: Iterator[int]
            ) -> tuple[list[ToolCall] | ToolCallError, float, int]:
    """(result, seconds, peak bytes allocated while decoding)."""
    tracemalloc.start()
    began = time.perf_counter()
    decoder = ToolCallDecoder(tokenizer)
    for token in tokens:
        decoder.feed(token)
    result = decoder.finish()
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def repeat(tokens: list[int], times: int) -> Iterator[int]:
    for _ in range(times):
        yield from tokens


@pytest.mark.parametrize("version", ["v3", "v13"])
def test_a_million_tool_call_markers(tokenizers: Callable[..., MistralTokenizer],
                                     version: str) -> None:
    tokenizer = tokenizers(version)
    marker = tokenizer.instruct_tokenizer.tokenizer.get_special_token("[TOOL_CALLS]")
    result, seconds, peak = measure(tokenizer, repeat([marker], 1_000_000))
    assert str(result) == f"the answer has more than {MAX_CALLS} tool calls"
    assert peak < 1 << 20  # kept nothing once past the bound
    assert seconds < 60  # linear: about a second here; mistral-common's split recurses per marker


@pytest.mark.parametrize("version", ["v3", "v13"])
def test_a_megabyte_of_unclosed_json(tokenizers: Callable[..., MistralTokenizer],
                                     version: str) -> None:
    tokenizer = tokenizers(version)
    raw = tokenizer.instruct_tokenizer.tokenizer
    chunk = raw.encode('{"a": [' * 1000, bos=False, eos=False)  # 7000 characters
    head = named_tokens(tokenizer, "[TOOL_CALLS]", "read_file", "[ARGS]") if version == "v13" \
        else [raw.get_special_token("[TOOL_CALLS]")]
    tokens = iter([*head, *repeat(chunk, 150)])  # 1.05 million characters
    result, seconds, peak = measure(tokenizer, tokens)
    assert str(result) == f"the tool calls are longer than {MAX_CALL_CHARS} characters"
    assert peak < 8 << 20  # the 256 KiB buffer (up to 4 bytes a character) and change
    assert seconds < 60


def test_deeply_nested_json_fails_fast_in_the_list_format(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    tokenizer = tokenizers("tekken")
    raw = tokenizer.instruct_tokenizer.tokenizer
    opening, closing = (raw.encode(c * 1000, bos=False, eos=False) for c in "[]")
    tokens = iter([raw.get_special_token("[TOOL_CALLS]"), *repeat(opening, 100),
                   *repeat(closing, 100)])  # 100000 levels, 200000 characters: under the cap
    result, seconds, peak = measure(tokenizer, tokens)
    assert str(result) == "the tool calls are nested too deeply"
    assert peak < 8 << 20
    assert seconds < 60


def test_deeply_nested_arguments_fail_fast_in_validation(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    tokenizer = tokenizers("v13")
    raw = tokenizer.instruct_tokenizer.tokenizer
    opening = raw.encode('{"a":' * 1000, bos=False, eos=False)
    closing = raw.encode("}" * 1000, bos=False, eos=False)
    tokens = iter([*named_tokens(tokenizer, "[TOOL_CALLS]", "read_file", "[ARGS]"),
                   *repeat(opening, 40), *raw.encode("1", bos=False, eos=False),
                   *repeat(closing, 40)])  # 40000 levels, 240001 characters
    result, _, _ = measure(tokenizer, tokens)
    assert isinstance(result, list) and len(result[0].arguments) == 240_001
    began = time.perf_counter()
    assert str(validate_arguments(BUILTIN_TOOLS["read_file"], result[0].arguments)) == (
        "read_file: the arguments are nested too deeply")
    assert time.perf_counter() - began < 10


# --- Remote backends (OpenAI format) ------------------------------------------------------------


def test_openai_calls_become_tool_calls() -> None:
    calls = tool_calls_from_openai([
        {"id": "abc123XYZ", "type": "function",
         "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}},
        {"id": "call_0123456789abcdef", "type": "function",
         "function": {"name": "list_files", "arguments": {"glob": "*.py"}}},
        {"function": {"name": "list_files", "arguments": ""}},
        {"id": "abc123XYZ", "function": {"name": "list_files", "arguments": None}},
    ], new_id=ids("gen000001", "gen000002", "gen000003"))
    assert calls == [
        ToolCall("abc123XYZ", "read_file", '{"path": "a.py"}'),
        ToolCall("gen000001", "list_files", '{"glob": "*.py"}'),  # an id Mistral would refuse
        ToolCall("gen000002", "list_files", ""),  # validate_arguments reads "" as {}
        ToolCall("gen000003", "list_files", "{}"),  # a repeated id
    ]


@pytest.mark.parametrize(("calls", "message"), [
    (["read_file"], "tool_calls[0] has no function object"),
    ([{"id": "x"}], "tool_calls[0] has no function object"),
    ([{"function": {"name": "../../bin/sh", "arguments": "{}"}}],
     'tool_calls[0]: "../../bin/sh" is not a valid tool name (letters, digits, _ and -, at most '
     "64)"),
    ([{"function": {"name": "read_file", "arguments": "x" * (MAX_CALL_CHARS + 1)}}],
     f"tool_calls[0]: the arguments are longer than {MAX_CALL_CHARS} characters"),
    ([{"function": {"name": "list_files"}}] * (MAX_CALLS + 1),
     f"the answer has more than {MAX_CALLS} tool calls"),
])
def test_malformed_openai_calls_are_errors(calls: list[Any], message: str) -> None:
    result = tool_calls_from_openai(calls)
    assert isinstance(result, ToolCallError) and str(result) == message


def test_the_synthetic_v11_and_v13_tokenizers_have_their_versions(
        tokenizers: Callable[..., MistralTokenizer]) -> None:
    for version in ("v11", "v13"):
        instruct = tokenizers(version).instruct_tokenizer
        assert type(instruct).__name__ == f"InstructTokenizerV{version[1:]}"
