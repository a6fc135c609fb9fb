"""The model's tool calls: parsed from the local engine's tokens as they are generated, or
taken from a remote backend's OpenAI-format calls. Either way each becomes a `ToolCall` whose
arguments the loop then checks with `tools.validate_arguments`.

The formats, per tokenizer version (as mistral-common 1.13's instruct tokenizers encode an
assistant turn with tool calls; the tests encode such turns with each tokenizer and parse
them back):
- v1: no [TOOL_CALLS] token, so no tool calls: everything is text.
- v2: `[TOOL_CALLS] [{"name": "read_file", "arguments": {"path": "a.py"}}, ...]`: one JSON
  list (SentencePiece puts a space before it).
- v3 and v7 (SentencePiece v3 and v7; Tekken 240718 and 240911 are v3 too): the same list,
  each call with an `"id"` after its arguments. v7 may have text before [TOOL_CALLS].
- v11: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` for each call, the [CALL_ID] part optional.
- v13 and later: `[TOOL_CALLS]name[ARGS]{...}` for each call; no id in the tokens.
The turn then ends with EOS (which the engine does not pass on).

mistral-common has a parser for these (`mistral_common.experimental.tools._decode_tool_calls`);
the tests use it as the reference this parser must agree with, but it is not used here: it is
private and experimental, it takes the whole token list after generation (no streaming), it
splits the list with one recursion per [TOOL_CALLS] token (a RecursionError past ~1000 of
them, quadratic copying before) and lets the json module's RecursionError through.

Call ids: mistral-common's validation wants `^[a-zA-Z0-9]{9}$` for v3 to v11 and a non-empty id
other than "null" from v13. A model's own id is kept when it has that form and is not used
twice in the turn (encoding the turn again then gives back the tokens it generated, so the
prefix cache reuses them); otherwise the call gets a fresh random one.

Bounds: the text after [TOOL_CALLS] is kept up to `max_chars` characters and `max_calls`
calls; past either, nothing more is kept (memory stays bounded whatever the model emits) and
`finish` returns an error. Each token costs O(1) work, so a megabyte of markers takes linear
time. JSON is parsed by the json module, whose C parser raises RecursionError at Python's
recursion limit (about 1000 levels), caught here: deep nesting fails fast instead of crashing.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mistral_common.tokens.tokenizers.base import Tokenizer, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine import TextStream

from ..backends.base import ToolCall
from .errors import ToolCallError

MAX_CALL_CHARS = 256 * 1024
MAX_CALLS = 32
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_ALPHABET = string.ascii_letters + string.digits
_SHOWN_CHARS = 80
_MARKERS = {"args": "[ARGS]", "id": "[CALL_ID]"}


def new_call_id() -> str:
    """Nine random letters and digits: the id form every Mistral tokenizer version accepts."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _special(raw: Tokenizer, token: str) -> int | None:
    """The id of control token `token`, None when the tokenizer lacks it (SentencePiece maps
    unknown pieces to <unk>; Tekken raises)."""
    try:
        ident = raw.get_special_token(token)
    except (ValueError, KeyError):
        return None
    return None if ident == raw.unk_id else ident


class _Ids:
    """Hands out the turn's call ids: the model's when usable, else fresh ones."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._used: set[str] = set()

    def take(self, proposed: object) -> str:
        if isinstance(proposed, str) and _CALL_ID.fullmatch(proposed) and (
                proposed not in self._used):
            ident = proposed
        else:
            ident = self._new_id()
            while ident in self._used:
                ident = self._new_id()
        self._used.add(ident)
        return ident


def _check_name(name: object, where: str) -> str | ToolCallError:
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    return ToolCallError(f"{where}: {_shown(name)} is not a valid tool name (letters, digits, _ "
                         "and -, at most 64)")


def _arguments_text(arguments: object) -> str:
    """Arguments as JSON text: a string is taken as the JSON itself (models and servers send
    both forms), anything else is serialised as mistral-common does."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _parse_json(text: str, what: str) -> Any:
    """`text` decoded, or a ToolCallError naming `what`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCallError(f"{what} are not valid JSON ({e.msg} at character {e.pos})")
    except RecursionError:
        return ToolCallError(f"{what} are nested too deeply")
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
        return ToolCallError(f"{what} hold a number too long to read")


@dataclass
class _Segment:
    """What follows one [TOOL_CALLS] token: fields filled as [CALL_ID] and [ARGS] switch."""

    fields: dict[str, io.StringIO] = field(default_factory=lambda: {"head": io.StringIO()})
    current: str = "head"
    problem: str | None = None

    def switch(self, name: str) -> None:
        if name in self.fields:
            self.problem = f"{_MARKERS[name]} appears twice"
        elif name == "id" and "args" in self.fields:
            self.problem = "[CALL_ID] comes after [ARGS]"
        self.fields.setdefault(name, io.StringIO())
        self.current = name

    def text(self, name: str) -> str | None:
        buffer = self.fields.get(name)
        return buffer.getvalue() if buffer is not None else None


class ToolCallDecoder:
    """Splits generated tokens into visible text and tool calls.

    `feed` each generated token; it returns the text the user sees (UTF-8-safe deltas, exactly
    as `engine.TextStream` gives them) until the [TOOL_CALLS] token, and "" from there on. At
    the end, `flush` gives the last visible text (a character cut short by the end) and `finish`
    the calls: [] for a plain answer, or a ToolCallError whose message can go back to the model.
    """

    def __init__(self, tokenizer: MistralTokenizer, *, max_chars: int = MAX_CALL_CHARS,
                 max_calls: int = MAX_CALLS, new_id: Callable[[], str] = new_call_id) -> None:
        raw = tokenizer.instruct_tokenizer.tokenizer
        self._version = raw.version
        newer = raw.version >= TokenizerVersion.v11
        self._tool_calls = _special(raw, "[TOOL_CALLS]")
        self._control = {
            token: name for token, name in (
                (_special(raw, "[ARGS]") if newer else None, "args"),
                (_special(raw, "[CALL_ID]") if newer else None, "id"))
            if token is not None}
        self._text = TextStream(tokenizer)
        self._call_text = TextStream(tokenizer)
        self._max_chars = max_chars
        self._max_calls = max_calls
        self._new_id = new_id
        self._segments: list[_Segment] = []
        self._size = 0
        self._error: ToolCallError | None = None

    @property
    def in_tool_calls(self) -> bool:
        """Whether [TOOL_CALLS] has come: the rest of the turn is calls, not text."""
        return bool(self._segments) or self._error is not None

    def feed(self, token: int) -> str:
        if not self.in_tool_calls:
            if token != self._tool_calls:
                return self._text.push(token)
            self._start()
            return self._text.flush()
        if self._error is not None:
            return ""
        if token == self._tool_calls:
            self._close_field()
            self._start()
        elif token in self._control:
            self._close_field()
            self._segments[-1].switch(self._control[token])
        else:
            self._append(self._call_text.push(token))
        return ""

    def flush(self) -> str:
        """The visible text still held back (only before [TOOL_CALLS])."""
        return "" if self.in_tool_calls else self._text.flush()

    def finish(self) -> list[ToolCall] | ToolCallError:
        if self._error is not None:
            return self._error
        if not self._segments:
            return []
        self._close_field()
        if self._control:
            return self._finish_named()
        return self._finish_json()

    def _start(self) -> None:
        if len(self._segments) == self._max_calls:
            self._fail(f"the answer has more than {self._max_calls} tool calls")
        else:
            self._segments.append(_Segment())

    def _close_field(self) -> None:
        if self._segments:
            self._append(self._call_text.flush())

    def _append(self, piece: str) -> None:
        if not piece or self._error is not None:
            return
        self._size += len(piece)
        if self._size > self._max_chars:
            self._fail(f"the tool calls are longer than {self._max_chars} characters")
            return
        segment = self._segments[-1]
        segment.fields[segment.current].write(piece)

    def _fail(self, message: str) -> None:
        self._error = ToolCallError(message)
        self._segments = []  # free what was kept: nothing more is

    def _finish_named(self) -> list[ToolCall] | ToolCallError:
        """v11+: `name[CALL_ID]id[ARGS]{...}` per segment."""
        ids, calls = _Ids(self._new_id), []
        for index, segment in enumerate(self._segments):
            where = f"tool call {index + 1}"
            if segment.problem is not None:
                return ToolCallError(f"{where}: {segment.problem}")
            name = _check_name((segment.text("head") or "").strip(), where)
            if isinstance(name, ToolCallError):
                return name
            arguments = segment.text("args")
            if arguments is None:
                return ToolCallError(f"{where} ({name}) has no [ARGS]")
            proposed = segment.text("id")
            calls.append(ToolCall(ids.take(proposed.strip() if proposed else None), name,
                                  arguments.strip()))
        return calls

    def _finish_json(self) -> list[ToolCall] | ToolCallError:
        """v2 to v7: a JSON list of {"name", "arguments", "id"?} after each [TOOL_CALLS]."""
        items: list[Any] = []
        for segment in self._segments:
            body = (segment.text("head") or "").strip()
            if not body:
                return ToolCallError("[TOOL_CALLS] is followed by no tool call")
            value = _parse_json(body, "the tool calls")
            if isinstance(value, ToolCallError):
                return value
            items.extend(value if isinstance(value, list) else [value])
        if len(items) > self._max_calls:
            return ToolCallError(f"the answer has more than {self._max_calls} tool calls")
        ids, calls = _Ids(self._new_id), []
        for index, item in enumerate(items):
            where = f"tool call {index + 1}"
            if not isinstance(item, dict):
                return ToolCallError(f"{where} is not a JSON object with a name and arguments")
            name = _check_name(item.get("name"), where)
            if isinstance(name, ToolCallError):
                return name
            calls.append(ToolCall(ids.take(item.get("id")), name,
                                  _arguments_text(item.get("arguments"))))
        return calls


def tool_calls_from_openai(calls: Sequence[Any], *, max_calls: int = MAX_CALLS,
                           new_id: Callable[[], str] = new_call_id
                           ) -> list[ToolCall] | ToolCallError:
    """Remote backends' calls (`{"id", "type": "function", "function": {"name",
    "arguments"}}`, the arguments a JSON string or, from lenient servers, an object) as
    ToolCalls, with the same checks and id rules as the local engine's."""
    if len(calls) > max_calls:
        return ToolCallError(f"the answer has more than {max_calls} tool calls")
    ids, result = _Ids(new_id), []
    for index, call in enumerate(calls):
        where = f"tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return ToolCallError(f"{where} has no function object")
        name = _check_name(function.get("name"), where)
        if isinstance(name, ToolCallError):
            return name
        arguments = _arguments_text(function.get("arguments"))
        if len(arguments) > MAX_CALL_CHARS:
            return ToolCallError(f"{where}: the arguments are longer than {MAX_CALL_CHARS} "
                                 "characters")
        result.append(ToolCall(ids.take(call.get("id")), name, arguments))
    return result
