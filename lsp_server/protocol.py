"""Our layer over pygls' LanguageServerProtocol: the JSON-RPC behaviour clients rely on.

pygls 2.1.1 gets a few things wrong for a server that must keep serving through bad input
(see ../shared/FACTS.md); each fix lives here, at the protocol layer it belongs to:

- a request whose params fail to deserialise got no reply at all (the client waits forever):
  it now gets -32602 InvalidParams naming the method;
- malformed JSON was only logged: it now gets -32700 ParseError (id null);
- a handler's exception went out as -32603 with the full traceback, absolute paths included,
  in `error.data`: the data is dropped (the traceback stays in our stderr log);
- a request before `initialize` got -32603: it now gets -32002 ServerNotInitialized;
- `exit` without `shutdown` ended the process with code 0; the spec says 1 (see cli.main);
- pygls' own copy of each document (split with `str.splitlines()`, wrong for LSP) is not kept:
  the text-sync notifications go straight to our handlers, which keep the exact copy.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcParseError
from pygls.protocol import LanguageServerProtocol, lsp_method

log = logging.getLogger(__name__)

SERVER_NOT_INITIALIZED = -32002


class _Answered:
    """Stands for a message that was already answered while being parsed."""

    jsonrpc = "2.0"


class TramontaneProtocol(LanguageServerProtocol):
    _initialized = False

    @property
    def shutdown_requested(self) -> bool:
        return bool(self._shutdown)

    # --- parsing ---------------------------------------------------------------------------

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException:
            if "jsonrpc" in data and "id" in data and "method" in data:
                method = data.get("method")
                self._send_response(
                    data["id"],
                    error=JsonRpcInvalidParams(f"invalid params for {method}").to_response_error(),
                )
                return _Answered()
            raise

    def handle_message(self, message: Any) -> None:
        if isinstance(message, _Answered):
            return
        if not self._initialized and isinstance(message, types.InitializeRequest):
            self._initialized = True
        elif not self._initialized and hasattr(message, "id") and hasattr(message, "method"):
            self._send_response(message.id, error=types.ResponseError(
                code=SERVER_NOT_INITIALIZED, message="the server is not initialized yet"))
            return
        super().handle_message(message)

    def report_parse_error(self, error: Exception) -> None:
        self._send_response(None, error=JsonRpcParseError(  # type: ignore[arg-type]
            f"could not parse the message ({type(error).__name__})").to_response_error())

    # --- responses -------------------------------------------------------------------------

    def _send_response(self, msg_id: Any, result: Any = None,
                       error: types.ResponseError | None = None) -> None:
        if error is not None and error.data is not None:
            # pygls puts the traceback here: keep it in the log, not on the wire.
            log.debug("dropping error data for %s: %s", msg_id, error.data)
            error = types.ResponseError(code=error.code, message=error.message)
        super()._send_response(msg_id, result, error)

    # --- text sync: our handlers only ------------------------------------------------------

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Any:
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None


def is_parse_error(error: Exception) -> bool:
    return isinstance(error, (json.JSONDecodeError, UnicodeDecodeError))
