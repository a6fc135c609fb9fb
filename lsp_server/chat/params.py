"""`tramontane/chat` params, checked: every problem is one message naming the field, which the
client gets as -32602 (and the server keeps serving).

    {chatId: string, messages: Message[], tools?: boolean | string[], clientTools?: ToolSpec[],
     sampling?: {maxTokens?, temperature?, topP?}, context?: {uri, range?}}

`Message` is the OpenAI/Mistral chat shape; its content is a string or a list of parts
(`{type: "text", text}`, `{type: "image_url", image_url: {url}}`). The last message is the
user's new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..backends.base import ToolSpec

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096


class ParamsError(ValueError):
    """Params that do not have the documented shape."""


@dataclass(frozen=True)
class Context:
    uri: str
    range: dict[str, Any] | None = None  # an LSP range, in the session's position encoding


@dataclass(frozen=True)
class ChatParams:
    chat_id: str
    messages: list[dict[str, Any]]
    tools: bool | list[str] = True
    client_tools: tuple[ToolSpec, ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    context: Context | None = None


def plain(value: Any) -> Any:
    """JSON values as dicts and lists, whatever the JSON-RPC layer made of them (pygls turns
    objects of unknown methods into named tuples)."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _require(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ParamsError(f"{where}{key} is required")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ParamsError(f"{where}{key} has the wrong type ({type(value).__name__})")
    return value


def _message(message: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]."
    if not isinstance(message, dict):
        raise ParamsError(f"messages[{i}] must be an object")
    role = _require(message, "role", str, where)
    if role not in ROLES:
        raise ParamsError(f"{where}role must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _part(part, f"{where}content[{j}]")
    elif content is not None and not isinstance(content, str):
        raise ParamsError(f"{where}content must be a string, a list of parts or null")
    if role == "tool":
        _require(message, "tool_call_id", str, where)
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise ParamsError(f"{where}tool_calls must be a list, on assistant messages only")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(call.get("id"), str)
                    and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), str)):
                raise ParamsError(f"{where}tool_calls[{j}] must be {{id, function: {{name, "
                                  "arguments}}}}")
    return message


def _part(part: Any, where: str) -> None:
    if not isinstance(part, dict):
        raise ParamsError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ParamsError(f"{where}.text must be a string")
    elif kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ParamsError(f"{where}.image_url.url must be a string")
    else:
        raise ParamsError(f"{where}.type must be \"text\" or \"image_url\", got {kind!r}")


def _tool_spec(spec: Any, i: int) -> ToolSpec:
    where = f"clientTools[{i}]."
    if not isinstance(spec, dict):
        raise ParamsError(f"clientTools[{i}] must be an object")
    name = _require(spec, "name", str, where)
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ParamsError(f"{where}parameters must be a JSON schema object")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise ParamsError(f"{where}description must be a string")
    return ToolSpec(name, description, parameters)


def _number(sampling: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = sampling.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not lo <= value <= hi:
        raise ParamsError(f"sampling.{key} must be a number from {lo:g} to {hi:g}")
    return float(value)


def parse_chat_params(data: Any) -> ChatParams:
    if not isinstance(data, dict):
        raise ParamsError("params must be an object")
    chat_id = _require(data, "chatId", str, "")
    if not chat_id:
        raise ParamsError("chatId must not be empty")
    messages = _require(data, "messages", list, "")
    if not messages or len(messages) > MAX_MESSAGES:
        raise ParamsError(f"messages must hold 1 to {MAX_MESSAGES} messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    if checked[-1]["role"] != "user":
        raise ParamsError("the last message must be the user's")
    tools = data.get("tools", True)
    if not (isinstance(tools, bool) or (isinstance(tools, list) and
            all(isinstance(t, str) for t in tools))):
        raise ParamsError("tools must be true, false or a list of tool names")
    client_tools = data.get("clientTools") or []
    if not isinstance(client_tools, list):
        raise ParamsError("clientTools must be a list")
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ParamsError("sampling must be an object")
    max_tokens = sampling.get("maxTokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or
                                   not isinstance(max_tokens, int) or
                                   not 1 <= max_tokens <= 32768):
        raise ParamsError("sampling.maxTokens must be an integer from 1 to 32768")
    context = data.get("context")
    parsed_context = None
    if context is not None:
        if not isinstance(context, dict) or not isinstance(context.get("uri"), str):
            raise ParamsError("context must be {uri, range?}")
        span = context.get("range")
        if span is not None and not isinstance(span, dict):
            raise ParamsError("context.range must be an LSP range")
        parsed_context = Context(context["uri"], span)
    return ChatParams(
        chat_id=chat_id, messages=checked, tools=tools,
        client_tools=tuple(_tool_spec(s, i) for i, s in enumerate(client_tools)),
        max_tokens=max_tokens, temperature=_number(sampling, "temperature", 0.0, 5.0),
        top_p=_number(sampling, "topP", 0.0001, 1.0), context=parsed_context)
