"""Our layer over pygls' LanguageServerProtocol: the JSON-RPC behaviour clients rely on.

pygls 2.1.1 gets a few things wrong for a server that must keep serving through bad input
(see ../shared/FACTS.md); each fix lives here, at the layer it belongs to (framing, the layer
below, is `transport.py`):

- pygls parsed each body with an `object_hook` that structured every nested object carrying
  "jsonrpc" as a message: a request-shaped object inside `didChangeConfiguration` settings or a
  request's `context` got replies of its own. `receive` parses plain JSON and structures the top
  level only;
- malformed JSON (deep nesting included) was only logged: it gets -32700 ParseError (id null);
- a body that is not a JSON-RPC object (`null`, `[]`, `42`, no "jsonrpc", an id that is an
  object) got no reply, or -32603 "unhashable type": it gets -32600 InvalidRequest, with its id
  when it has a valid one (null otherwise, as JSON-RPC 2.0 says);
- an unknown method got -32602 (or nothing): -32601 MethodNotFound for a request; an unknown
  notification is ignored, as `$/` notifications we cannot read are;
- a request whose params fail to deserialise got no reply at all (the client waits forever):
  it gets -32602 InvalidParams naming the method; and params are checked strictly (lsprotocol's
  converter turned `"line": 1.5` into 1 and a uri of 42 into "42");
- a handler's exception went out as -32603 with the full traceback, absolute paths included,
  in `error.data`: the data is dropped (the traceback stays in our stderr log);
- a request before `initialize` got -32603: it now gets -32002 ServerNotInitialized; after
  `shutdown` it got no reply: it gets -32600;
- `exit` called `sys.exit` (code 0 even without `shutdown`, and the interpreter then waited for
  the engine thread): it ends the session through the transport, code 0 after `shutdown`, 1
  otherwise;
- pygls' own copy of each document (split with `str.splitlines()`, wrong for LSP) is not kept:
  the text-sync notifications go straight to our handlers, which keep the exact copy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator
from enum import Enum
from typing import TYPE_CHECKING, Any

from cattrs import Converter
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcParseError
from pygls.protocol import LanguageServerProtocol, lsp_method

if TYPE_CHECKING:
    from pygls.lsp.server import LanguageServer

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
SERVER_NOT_INITIALIZED = -32002

MsgId = int | str
_JSON_KINDS = {type(None): "null", list: "an array", int: "a number", float: "a number",
               str: "a string", bool: "a boolean"}


class TramontaneProtocol(LanguageServerProtocol):
    _initialized = False
    # Set by the transport: ends the session with an exit code (see `lsp_exit`).
    on_exit: Callable[[int], None] | None = None

    def __init__(self, server: LanguageServer, converter: Converter) -> None:
        super().__init__(server, converter)
        _strict_scalars(converter)

    @property
    def shutdown_requested(self) -> bool:
        return bool(self._shutdown)

    @property
    def exit_code(self) -> int:
        """What the LSP specification asks of the process: 0 after `shutdown`, 1 otherwise."""
        return 0 if self._shutdown else 1

    # --- receiving -------------------------------------------------------------------------

    def receive(self, body: bytes) -> None:
        """One framed message: parse it, check its shape, structure its top level, handle it.
        Every request gets exactly one reply; nothing a client sends raises from here."""
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            log.warning("malformed message: %s", type(e).__name__)
            self.report_parse_error(e)
            return
        if not isinstance(data, dict):
            kind = _JSON_KINDS.get(type(data), type(data).__name__)
            self.send_error(None, INVALID_REQUEST,
                            f"invalid request: a JSON-RPC message is an object, not {kind}")
            return
        problem, msg_id = _shape_problem(data)
        if problem is not None:
            self.send_error(msg_id, INVALID_REQUEST, f"invalid request: {problem}")
            return
        method = data.get("method")
        is_request = method is not None and "id" in data
        if is_request and not self._initialized and method != types.INITIALIZE:
            self.send_error(msg_id, SERVER_NOT_INITIALIZED, "the server is not initialized yet")
            return
        if method is not None and not self._serves(method):
            if is_request:
                self.send_error(msg_id, METHOD_NOT_FOUND, f"method not found: {method}")
            else:
                log.debug("ignoring the notification %s", method)
            return
        if is_request and self._shutdown and method != types.EXIT:
            self.send_error(msg_id, INVALID_REQUEST,
                            "invalid request: the server is shutting down")
            return
        try:
            message = self.structure_message(data)
        except JsonRpcException:  # pygls' wrapping of the converter's errors (logged there)
            if is_request:
                self.send_error(msg_id, INVALID_PARAMS, f"invalid params for {method}")
            elif method is not None and not method.startswith("$/"):
                log.warning("dropped the notification %s: invalid params", method)
            return
        try:
            self.handle_message(message)
        except Exception as e:
            # pygls answers a failing request handler itself; what reaches here is a failure
            # around the handlers (a notification's dispatch, cancellation). One message must
            # not end the session: log it with its traceback and go on.
            log.exception("failed to handle %s", method or "a response")
            self._server._report_server_error(e, JsonRpcException)

    def _serves(self, method: str) -> bool:
        return method == types.CANCEL_REQUEST or method in self.fm.builtin_features or \
            method in self.fm.features

    def reject(self, code: int, message: str, head: bytes) -> None:
        """Input the transport could not deliver as a message; `head` is the start of its body
        (possibly cut anywhere), where the request's id may be found."""
        self.send_error(request_id(head), code, message)

    def handle_message(self, message: Any) -> None:
        if isinstance(message, types.InitializeRequest):
            self._initialized = True
        super().handle_message(message)

    def report_parse_error(self, error: Exception) -> None:
        self._send_response(None, error=JsonRpcParseError(  # type: ignore[arg-type]
            f"could not parse the message ({type(error).__name__})").to_response_error())

    # --- responses -------------------------------------------------------------------------

    def send_error(self, msg_id: MsgId | None, code: int, message: str) -> None:
        self._send_response(msg_id, error=types.ResponseError(  # type: ignore[arg-type]
            code=code, message=message))

    def _send_response(self, msg_id: Any, result: Any = None,
                       error: types.ResponseError | None = None) -> None:
        if error is not None and error.data is not None:
            # pygls puts the traceback here: keep it in the log, not on the wire.
            log.debug("dropping error data for %s: %s", msg_id, error.data)
            error = types.ResponseError(code=error.code, message=error.message)
        super()._send_response(msg_id, result, error)

    # --- lifecycle -------------------------------------------------------------------------

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(types.EXIT)) is not None:
            yield handler, args, None
        if self.on_exit is None:  # not under our transport: pygls' way
            raise SystemExit(self.exit_code)
        self.on_exit(self.exit_code)

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


def _valid_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _shape_problem(data: dict[str, Any]) -> tuple[str | None, MsgId | None]:
    """(what makes `data` an invalid JSON-RPC 2.0 message or None, the id to reply to)."""
    msg_id = data.get("id")
    if "id" in data and not _valid_id(msg_id):
        return "the id must be an integer or a string", None
    if data.get("jsonrpc") != "2.0":
        return '"jsonrpc" must be "2.0"', msg_id
    if "method" in data:
        if not isinstance(data["method"], str):
            return '"method" must be a string', msg_id
        if data.get("params") is not None and not isinstance(data["params"], (dict, list)):
            return "params must be an object or an array", msg_id
        return None, msg_id
    if "id" in data and ("result" in data or "error" in data):
        return None, msg_id  # a response to one of our requests
    return "no method, result or error", msg_id


def request_id(head: bytes) -> MsgId | None:
    """The id of the request whose body begins with `head` (whole or cut anywhere), when its
    top-level members before the cut include a valid "id" and no "result" or "error" (which
    would make it a response). Only what is fully in `head` is read."""
    text = head.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    found: object = None

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    if not text.startswith("{", i):
        return None
    i += 1
    while True:
        try:
            key, i = decoder.raw_decode(text, skip(i))
            i = skip(i)
            if not text.startswith(":", i):
                break
            value, i = decoder.raw_decode(text, skip(i + 1))
        except (ValueError, RecursionError):
            break  # the cut, or not JSON: what was read is all there is
        i = skip(i)
        if i == len(text):
            break  # a number may go on past the cut: "3" of "31"
        if key in ("result", "error"):
            return None
        if key == "id":
            found = value
        if not text.startswith(",", i):
            break
        i += 1
    return found if _valid_id(found) else None  # type: ignore[return-value]


def _strict_scalars(converter: Converter) -> None:
    """Structure JSON scalars only into their own types. lsprotocol's converter coerces the
    Python way (`int(1.5) == 1`, `str(42) == "42"`, `bool("no") is True`) and passes any value
    for an id or a progress token, so ill-typed params were served as something the client
    never sent. The hooks for `int` and `str` also serve their enums (cattrs dispatches an
    IntEnum to `int`'s hook): those get the member, as before, from a value of the right type."""

    def strict(name: str, accepts: tuple[type, ...]) -> Callable[[Any, Any], Any]:
        def structure(value: Any, cls: Any) -> Any:
            if not isinstance(value, accepts) or (isinstance(value, bool) and bool not in
                                                  accepts):
                kind = _JSON_KINDS.get(type(value), "an object")
                raise TypeError(f"expected {name}, got {kind}")
            return cls(value) if isinstance(cls, type) and issubclass(cls, Enum) else value
        return structure

    converter.register_structure_hook(int, strict("an integer", (int,)))
    converter.register_structure_hook(float, strict("a number", (int, float)))
    converter.register_structure_hook(str, strict("a string", (str,)))
    converter.register_structure_hook(bool, strict("a boolean", (bool,)))
    converter.register_structure_hook(int | str, strict("an integer or a string", (int, str)))
    converter.register_structure_hook(int | str | None, strict(
        "an integer, a string or null", (int, str, type(None))))


def is_parse_error(error: Exception) -> bool:
    """For errors pygls' own reader loops report (our transport answers them in `receive`)."""
    return isinstance(error, (json.JSONDecodeError, UnicodeDecodeError))
