"""The tools of one chat turn and how each call runs: the built-in workspace tools in the
server (`tools.py`, inside the sandbox), the editor's own tools (`clientTools`) through
`tramontane/runTool`, an edit proposal through `workspace/applyEdit`. Every call is validated
against its tool's JSON schema first; an unknown tool, a call the model wrote badly, arguments
that break the schema, a tool that fails or runs out of time: each becomes an error result the
model reads, and the loop goes on.

Time: each call is bounded by `chat.toolTimeoutMs`, except the user's review of a proposed
edit, which takes what it takes (the request's cancellation still ends it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..backends.base import INVALID_CALL, ToolCall, ToolSpec
from .edits import ProposedEdit
from .errors import ToolError
from .filetools import OpenDocument
from .sandbox import Workspace
from .service import ToolOutcome
from .tools import cap_output, run_tool, validate_arguments

# Runs one of the editor's tools: (name, call id, arguments) -> outcome.
ClientRunner = Callable[[str, str, dict[str, Any]], Awaitable[ToolOutcome]]
# Shows a proposed edit to the user and waits for the verdict: True if applied.
EditApplier = Callable[[ProposedEdit], Awaitable[bool]]


class ToolBox:
    """A `service.ToolHost` for one turn."""

    def __init__(self, builtin: Sequence[ToolSpec], client: Sequence[ToolSpec],
                 workspace: Workspace, *, run_client: ClientRunner, apply_edit: EditApplier,
                 timeout_s: float, output_chars: int,
                 open_document: OpenDocument | None = None) -> None:
        self._builtin = {t.name: t for t in builtin}
        # A built-in tool offered takes its name; one not offered leaves it to the editor's.
        self._client = {t.name: t for t in client if t.name not in self._builtin}
        self._workspace = workspace
        self._run_client = run_client
        self._apply_edit = apply_edit
        self._timeout = timeout_s
        self._output_chars = output_chars
        self._open_document = open_document

    @property
    def specs(self) -> Sequence[ToolSpec]:
        return [*self._builtin.values(), *self._client.values()]

    async def run(self, call: ToolCall) -> ToolOutcome:
        if call.name == INVALID_CALL:
            return ToolOutcome(_invalid_call_message(call.arguments), is_error=True)
        spec = self._builtin.get(call.name) or self._client.get(call.name)
        if spec is None:
            known = ", ".join([*self._builtin, *self._client]) or "none"
            return ToolOutcome(f"unknown tool {json.dumps(call.name)} (the tools are: {known})",
                               is_error=True)
        arguments = validate_arguments(spec, call.arguments)
        if isinstance(arguments, ToolError):
            return ToolOutcome(cap_output(str(arguments), self._output_chars), is_error=True)
        if call.name in self._builtin:
            return await self._builtin_call(call.name, arguments)
        try:
            outcome = await asyncio.wait_for(
                self._run_client(call.name, call.id, arguments), self._timeout)
        except TimeoutError:
            return ToolOutcome(f"{call.name} did not finish within {self._timeout:g} s and was "
                               "abandoned", is_error=True)
        return ToolOutcome(cap_output(outcome.content, self._output_chars), outcome.is_error)

    async def _builtin_call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        result = await run_tool(name, arguments, self._workspace, timeout_s=self._timeout,
                                output_chars=self._output_chars,
                                open_document=self._open_document)
        if result.edit is None or result.is_error:
            return ToolOutcome(result.content, result.is_error)
        edit = result.edit
        applied = await self._apply_edit(edit)
        count = f"{len(edit.edits)} edit{'s' if len(edit.edits) != 1 else ''}"
        if applied:
            return ToolOutcome(f"the user reviewed and applied the {count} to {edit.shown}")
        return ToolOutcome(f"the user declined the {count} to {edit.shown}: the file is "
                           "unchanged")


def _invalid_call_message(arguments: str) -> str:
    try:
        problem = json.loads(arguments).get("problem", arguments)
    except (json.JSONDecodeError, AttributeError):
        problem = arguments
    return f"your tool call could not be read: {problem}. Write it again in the tool-call format"
