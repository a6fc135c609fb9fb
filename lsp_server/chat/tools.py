"""The built-in tools the model may call: their fixed names and JSON schemas, choosing them for
a request, checking a call's arguments, and running one call with a time limit and an output
cap.

The loop's order for each call: `validate_arguments(spec, call.arguments)` (bad JSON or a
schema violation becomes a tool error message the model can act on), then `run_tool` with the
dict it returned. `run_tool` runs the reading tools on a worker thread of its own and never
raises for anything the model did: every failure is a `ToolResult` with `is_error=True`.
propose_edit only checks the edits: its result carries a `ProposedEdit` for the loop to send to
the editor as workspace/applyEdit.

Time: `run_tool` waits `timeout_s`; past it, the result is an error and the thread is
abandoned (Python cannot stop a thread). It does not run on for long: walks and searches get
a budget of `BUDGET_SHARE` of the limit, after which they stop on their own and return what
they found (a partial result beats a timeout), and a regular expression is matched with that
budget as its timeout (see filetools). A read blocked in the kernel (a dead network mount) is
what can outlive the limit; the pool's threads bound how many such calls pile up.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, relevance
from jsonschema.validators import extend, validator_for
from referencing.exceptions import Unresolvable

from ..backends.base import ToolSpec
from . import filetools
from .edits import ProposedEdit, propose_edit
from .errors import ToolError
from .filetools import OpenDocument
from .sandbox import Workspace

BUDGET_SHARE = 0.5
WORKER_THREADS = 4
MAX_REPORTED_PROBLEMS = 3
PATTERN_TIMEOUT_S = 0.1
_PROBLEM_CHARS = 200

_PATH = {"type": "string", "maxLength": 4096}
_UINTEGER = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}  # LSP's uinteger
_POSITION = {
    "type": "object",
    "properties": {"line": _UINTEGER, "character": _UINTEGER},
    "required": ["line", "character"],
    "additionalProperties": False,
}


def _spec(name: str, description: str, properties: dict[str, Any],
          required: list[str]) -> ToolSpec:
    return ToolSpec(name, description, {"type": "object", "properties": properties,
                                        "required": required, "additionalProperties": False})


BUILTIN_TOOLS: dict[str, ToolSpec] = {spec.name: spec for spec in (
    _spec("read_file",
          "Read a text file of the workspace. Shows each line with its 1-based number and a tab "
          "before it (neither is part of the file). Give startLine and endLine to read part of "
          "a long file.",
          {"path": {**_PATH, "description": "File path, relative to the workspace folder"},
           "startLine": {"type": "integer", "minimum": 1,
                         "description": "First line to read (1-based, inclusive)"},
           "endLine": {"type": "integer", "minimum": 1,
                       "description": "Last line to read (1-based, inclusive)"}},
          ["path"]),
    _spec("list_files",
          "List the files and directories under a directory of the workspace, recursively "
          "(directories end with /; files ignored by .gitignore are left out).",
          {"path": {**_PATH, "description": "Directory, relative to the workspace folder "
                                            "(default: the workspace folder)"},
           "glob": {"type": "string", "maxLength": 1000,
                    "description": "Only entries matching this gitignore-style glob, e.g. "
                                   "*.py or src/**/test_*.ts"}},
          []),
    _spec("search_text",
          "Search the workspace's text files for lines containing a string (case-sensitive), "
          "or matching a regular expression. Shows path:line: text for each match.",
          {"query": {"type": "string", "minLength": 1, "maxLength": 1000,
                     "description": "The text to find, or a regular expression if regex is true"},
           "path": {**_PATH, "description": "File or directory to search (default: the "
                                            "workspace folder)"},
           "regex": {"type": "boolean", "description": "Treat query as a regular expression "
                                                       "(Python syntax; (?i) ignores case)"}},
          ["query"]),
    _spec("propose_edit",
          "Propose changes to a file; the user reviews them in the editor and accepts or "
          "rejects them. Each edit replaces a range with newText (an empty range inserts). "
          "Positions are 0-based: line n of read_file is line n-1 here; character counts "
          "UTF-16 code units from the line's start. Ranges must not overlap.",
          {"path": {**_PATH, "description": "File path, relative to the workspace folder"},
           "edits": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
               "type": "object",
               "properties": {
                   "range": {"type": "object",
                             "properties": {"start": _POSITION, "end": _POSITION},
                             "required": ["start", "end"], "additionalProperties": False},
                   "newText": {"type": "string"}},
               "required": ["range", "newText"],
               "additionalProperties": False}}},
          ["path", "edits"]),
)}


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool
    edit: ProposedEdit | None = None  # propose_edit's checked edits, for workspace/applyEdit


def select_tools(tools: bool | list[str] | None) -> list[ToolSpec]:
    """The built-in tools a request offers: True or None all, False none, a list those named
    (in the canonical order, so that the prompt does not depend on the list's order); ToolError
    naming the unknown names."""
    if tools is None or tools is True:
        return list(BUILTIN_TOOLS.values())
    if tools is False:
        return []
    unknown = [name for name in tools if name not in BUILTIN_TOOLS]
    if unknown:
        raise ToolError(f"unknown tool{'s' if len(unknown) > 1 else ''} in `tools`: "
                        f"{', '.join(json.dumps(n) for n in unknown)}; the built-in tools are "
                        f"{', '.join(BUILTIN_TOOLS)}")
    return [spec for name, spec in BUILTIN_TOOLS.items() if name in tools]


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """JSON Schema's "pattern" with the `regex` package and a time limit: jsonschema's own uses
    `re`, and a client tool's schema pattern against the model's string must not hang the
    event loop."""
    if not validator.is_type(instance, "string"):
        return
    try:
        matched = regex.search(pattern, instance, timeout=PATTERN_TIMEOUT_S)
    except regex.error as e:
        yield ValidationError(f"the schema's pattern {pattern!r} is invalid ({e})")
    except TimeoutError:
        yield ValidationError(f"matching the schema's pattern {pattern!r} took too long")
    else:
        if matched is None:
            yield ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    """A validator for the schema (cached by its JSON text). References are never fetched:
    jsonschema >= 4.18 retrieves no remote `$ref`, and one it cannot resolve is reported."""
    schema = json.loads(schema_json)
    cls = validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return extend(cls, {"pattern": _pattern})(schema)


def _signature(schema: dict[str, Any]) -> str:
    """`{path: string, startLine?: integer}`: the parameters, for messages."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return "a JSON object"
    required = schema.get("required") or []
    parts = [f"{name}{'' if name in required else '?'}: "
             f"{prop.get('type', 'any') if isinstance(prop, dict) else 'any'}"
             for name, prop in properties.items()]
    return "{" + ", ".join(parts) + "}"


def _location(error: ValidationError) -> str:
    where = ""
    for part in error.absolute_path:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return where


def check_arguments(spec: ToolSpec, arguments: Any) -> ToolError | None:
    """Why `arguments` (decoded JSON) do not fit the tool's schema, or None."""
    try:
        validator = _validator(json.dumps(spec.parameters, sort_keys=True))
    except SchemaError as e:
        return ToolError(f"{spec.name}: the tool's parameter schema is invalid ({e.message})")
    if not isinstance(arguments, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(arguments), "a number")
        return ToolError(f"{spec.name}: the arguments must be a JSON object "
                         f"{_signature(spec.parameters)}, not {kind}")
    try:
        errors = sorted(validator.iter_errors(arguments), key=relevance)
    except RecursionError:
        return ToolError(f"{spec.name}: the arguments are nested too deeply")
    except Unresolvable as e:
        return ToolError(f"{spec.name}: the tool's parameter schema refers to "
                         f"{json.dumps(e.ref)}, which cannot be resolved")
    if not errors:
        return None
    problems = []
    for error in errors[:MAX_REPORTED_PROBLEMS]:
        message = error.message
        if len(message) > _PROBLEM_CHARS:
            message = message[:_PROBLEM_CHARS] + "…"
        where = _location(error)
        problems.append(f"{where}: {message}" if where else message)
    more = len(errors) - len(problems)
    if more:
        problems.append(f"{more} more problem{'s' if more > 1 else ''}")
    return ToolError(f"{spec.name}: invalid arguments: {'; '.join(problems)}. Expected "
                     f"{_signature(spec.parameters)}")


def validate_arguments(spec: ToolSpec, arguments_json: str) -> dict[str, Any] | ToolError:
    """The call's arguments decoded and checked against the tool's schema, or the ToolError to
    send back to the model. Blank text means no arguments ({})."""
    if not arguments_json.strip():
        arguments_json = "{}"
    try:
        arguments = json.loads(arguments_json)
    except json.JSONDecodeError as e:
        return ToolError(f"{spec.name}: the arguments are not valid JSON ({e.msg} at line "
                         f"{e.lineno} column {e.colno})")
    except RecursionError:
        return ToolError(f"{spec.name}: the arguments are nested too deeply")
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
        return ToolError(f"{spec.name}: the arguments hold a number too long to read")
    problem = check_arguments(spec, arguments)
    return arguments if problem is None else problem


def cap_output(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters (at a line's end when one is near), ending with
    a line that says how much was cut."""
    if len(text) <= limit:
        return text

    def notice(cut: int) -> str:
        return f"\n[output truncated: {cut} of {len(text)} characters not shown]"

    reserve = len(notice(len(text)))
    if limit <= reserve:  # no room for the notice
        return text[:limit]
    keep = limit - reserve
    line_end = text.rfind("\n", 0, keep + 1)
    if line_end >= keep // 2:
        keep = line_end
    return text[:keep] + notice(len(text) - keep)


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="tramontane-tool")
    return _pool


def _run(name: str, arguments: dict[str, Any], workspace: Workspace, deadline: float,
         open_document: OpenDocument | None) -> ToolResult:
    if name == "propose_edit":
        edit = propose_edit(arguments, workspace, open_document)
        return ToolResult(edit.summary(), False, edit)
    if name == "read_file":
        return ToolResult(filetools.read_file(arguments, workspace, open_document), False)
    if name == "list_files":
        return ToolResult(filetools.list_files(arguments, workspace, deadline), False)
    return ToolResult(filetools.search_text(arguments, workspace, deadline), False)


async def run_tool(name: str, arguments: dict[str, Any], workspace: Workspace, *,
                   timeout_s: float, output_chars: int,
                   open_document: OpenDocument | None = None) -> ToolResult:
    """Run built-in tool `name` with checked `arguments`. `open_document` gives the editor's
    text of an open file (read_file and propose_edit then see unsaved changes too)."""
    spec = BUILTIN_TOOLS.get(name)
    if spec is None:
        return ToolResult(f"unknown tool {json.dumps(name)}; the tools are "
                          f"{', '.join(BUILTIN_TOOLS)}", True)
    problem = check_arguments(spec, arguments)
    if problem is not None:
        return ToolResult(cap_output(str(problem), output_chars), True)
    deadline = time.monotonic() + timeout_s * BUDGET_SHARE
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(_executor(), _run, name, arguments, workspace, deadline,
                                open_document)
    try:
        result = await asyncio.wait_for(work, timeout_s)
    except asyncio.TimeoutError:
        return ToolResult(f"{name} timed out after {timeout_s:g} s and was abandoned; ask for "
                          "less (a smaller path, a narrower query)", True)
    except ToolError as e:
        return ToolResult(cap_output(str(e), output_chars), True)
    except OSError as e:  # an I/O failure no tool anticipated; the message names no path
        return ToolResult(f"{name} failed: {e.strerror or type(e).__name__}", True)
    return ToolResult(cap_output(result.content, output_chars), False, result.edit)
