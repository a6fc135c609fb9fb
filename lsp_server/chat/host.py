"""The tools of one chat turn and how each call runs: the built-in workspace tools in the
server, the editor's own tools (`clientTools`) through `tramontane/runTool`, an edit proposal
through `workspace/applyEdit`. Every call is validated against its tool's JSON schema first;
an unknown tool, arguments that are not JSON or break the schema, a tool that fails or runs
out of time: each becomes an error result the model reads, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import jsonschema

from ..backends.base import ToolCall, ToolSpec
from .service import ToolOutcome

# Runs one of the editor's tools: (name, call id, arguments) -> outcome.
ClientRunner = Callable[[str, str, dict[str, Any]], Awaitable[ToolOutcome]]
# Runs one of the server's tools: (name, arguments) -> outcome.
ServerRunner = Callable[[str, dict[str, Any]], Awaitable[ToolOutcome]]


def check_arguments(spec: ToolSpec, arguments: str) -> dict[str, Any] | str:
    """The call's arguments as an object, or a message saying what is wrong with them."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except (json.JSONDecodeError, RecursionError) as e:
        return f"the arguments of {spec.name} are not valid JSON ({e})"
    if not isinstance(value, dict):
        return f"the arguments of {spec.name} must be a JSON object"
    try:
        jsonschema.validate(value, spec.parameters)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"invalid arguments for {spec.name}{f' at {where}' if where else ''}: " \
            f"{e.message}"
    except jsonschema.SchemaError as e:
        return f"the tool {spec.name} has an invalid schema: {e.message}"
    return value


class ToolBox:
    """A `service.ToolHost`: `server` tools run by `run_server`, `client` ones by
    `run_client`; `timeout_s` bounds each call (an abandoned call's result is dropped)."""

    def __init__(self, server: Sequence[ToolSpec], client: Sequence[ToolSpec],
                 run_server: ServerRunner, run_client: ClientRunner, timeout_s: float) -> None:
        self._server = {t.name: t for t in server}
        self._client = {t.name: t for t in client if t.name not in self._server}
        self._run_server = run_server
        self._run_client = run_client
        self._timeout = timeout_s

    @property
    def specs(self) -> Sequence[ToolSpec]:
        return [*self._server.values(), *self._client.values()]

    async def run(self, call: ToolCall) -> ToolOutcome:
        spec = self._server.get(call.name) or self._client.get(call.name)
        if spec is None:
            known = ", ".join(sorted([*self._server, *self._client])) or "none"
            return ToolOutcome(f"unknown tool {call.name!r} (available: {known})",
                               is_error=True)
        arguments = check_arguments(spec, call.arguments)
        if isinstance(arguments, str):
            return ToolOutcome(arguments, is_error=True)
        if call.name in self._server:
            work = self._run_server(call.name, arguments)
        else:
            work = self._run_client(call.name, call.id, arguments)
        try:
            return await asyncio.wait_for(work, self._timeout)
        except TimeoutError:
            return ToolOutcome(f"{call.name} did not finish within {self._timeout:g} s: "
                               "abandoned", is_error=True)
