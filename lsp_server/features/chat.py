"""`tramontane/chat` (a turn of a conversation, streamed as `tramontane/chatDelta`) and
`tramontane/chatClose` (the conversation was deleted: its cache goes)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

import engine

from ..backends.base import BackendError, Sampling
from ..chat.context import attachment, with_context
from ..chat.edits import ProposedEdit
from ..chat.errors import ChatError
from ..chat.host import ToolBox
from ..chat.params import ChatParams, ParamsError, parse_chat_params, plain
from ..chat.sandbox import Workspace
from ..chat.service import ToolHost, ToolOutcome, TurnResult
from ..chat.tools import select_tools
from ..convert import lsp_proposed_edit
from ..documents import Document, DocumentError

if TYPE_CHECKING:
    from ..server import TramontaneServer

log = logging.getLogger(__name__)

CHAT = "tramontane/chat"
CHAT_CLOSE = "tramontane/chatClose"
CHAT_DELTA = "tramontane/chatDelta"
RUN_TOOL = "tramontane/runTool"


def register(server: TramontaneServer) -> None:
    @server.feature(CHAT)
    async def chat(ls: TramontaneServer, params: Any) -> dict[str, Any]:
        try:
            request = parse_chat_params(plain(params))
        except ParamsError as e:
            raise JsonRpcInvalidParams(f"invalid params for {CHAT}: {e}") from None
        return await run_turn(ls, request)

    @server.feature(CHAT_CLOSE)
    def chat_close(ls: TramontaneServer, params: Any) -> None:
        value = plain(params)
        chat_id = value.get("chatId") if isinstance(value, dict) else None
        if isinstance(chat_id, str):
            ls.chats.forget(chat_id)


async def run_turn(ls: TramontaneServer, request: ChatParams) -> dict[str, Any]:
    settings = ls.settings.chat
    sampling = Sampling(max_tokens=request.max_tokens or settings.max_tokens,
                        temperature=settings.temperature if request.temperature is None
                        else request.temperature,
                        top_p=1.0 if request.top_p is None else request.top_p)
    user = _user_message(ls, request)
    host = _tool_host(ls, request)

    def delta(payload: dict[str, Any]) -> None:
        ls.protocol.notify(CHAT_DELTA, {"chatId": request.chat_id, **payload})

    try:
        result = await ls.chats.turn(request.chat_id, request.messages[:-1], [user], host,
                                     sampling, settings.max_tool_steps, delta)
    except (BackendError, engine.EngineError) as e:
        # A turn that cannot run: the message is the editor's to show (no vision encoder, no
        # tool support, a conversation the tokenizer refuses).
        raise RequestFailed(str(e)) from None
    except asyncio.CancelledError:
        log.info("chat %s cancelled", request.chat_id)
        raise
    return _result(request.chat_id, user, result)


class RequestFailed(JsonRpcException):
    """LSP's RequestFailed: the request was well formed, the server cannot serve it."""

    CODE = -32803


def _user_message(ls: TramontaneServer, request: ChatParams) -> dict[str, Any]:
    """The user's new message, with the editor's context attached if the request names one."""
    message = request.messages[-1]
    if request.context is None:
        return message
    try:
        document = ls.documents.get(request.context.uri)
        part = attachment(document, request.context.range, ls.position_encoding)
    except (DocumentError, ParamsError) as e:
        raise JsonRpcInvalidParams(f"invalid params for {CHAT}: context: {e}") from None
    return with_context(message, part)


def _tool_host(ls: TramontaneServer, request: ChatParams) -> ToolHost:
    settings = ls.settings.chat
    try:
        builtin = select_tools(request.tools)
        workspace = Workspace(_workspace_folders(ls), settings.denied_paths)
    except ChatError as e:  # an unknown tool name; a bad chat.deniedPaths pattern
        raise JsonRpcInvalidParams(f"invalid params for {CHAT}: {e}") from None

    async def run_client(name: str, call_id: str, arguments: dict[str, Any]) -> ToolOutcome:
        try:
            answer = plain(await ls.protocol.send_request_async(RUN_TOOL, {
                "chatId": request.chat_id, "id": call_id, "name": name,
                "arguments": arguments}))
        except JsonRpcException as e:
            return ToolOutcome(f"the editor could not run {name}: {e.message}", is_error=True)
        content = answer.get("content") if isinstance(answer, dict) else None
        if not isinstance(content, str):
            return ToolOutcome(f"the editor's answer for {name} has no text content",
                               is_error=True)
        return ToolOutcome(content, is_error=bool(answer.get("isError")))

    async def apply_edit(edit: ProposedEdit) -> bool:
        result = await ls.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(
            edit=lsp_proposed_edit(edit, ls.position_encoding),
            label=f"Tramontane: proposed edit to {edit.shown}"))
        return bool(result.applied)

    def open_document(path: Path) -> Document | None:
        try:
            return ls.documents.get(path.as_uri())
        except DocumentError:
            return None

    return ToolBox(builtin, request.client_tools, workspace, run_client=run_client,
                   apply_edit=apply_edit, timeout_s=settings.tool_timeout_ms / 1000,
                   output_chars=settings.tool_output_chars, open_document=open_document)


def _workspace_folders(ls: TramontaneServer) -> list[Path]:
    """The client's workspace folders that are local folders (the root when it names none)."""
    uris = [folder.uri for folder in ls.workspace.folders.values()]
    if not uris and ls.workspace.root_uri:
        uris = [ls.workspace.root_uri]
    folders = []
    for uri in uris:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            folders.append(Path(unquote(parsed.path)))
    return folders


def _result(chat_id: str, user: dict[str, Any], result: TurnResult) -> dict[str, Any]:
    return {
        "chatId": chat_id,
        "message": {"role": "assistant", "content": result.message.get("content") or ""},
        # The user's message as the model read it (with the context attached): send it back
        # in place of the one the editor sent, so the next turn's prompt starts the same way.
        "userMessage": user,
        "messages": result.messages[1:],
        "finishReason": result.finish_reason,
        "usage": {"promptTokens": result.usage.prompt_tokens,
                  "reusedTokens": result.usage.reused_tokens,
                  "generatedTokens": result.usage.generated_tokens},
    }

