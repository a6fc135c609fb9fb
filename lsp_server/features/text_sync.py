"""didOpen / didChange / didClose: the server's exact copy of each open document.

An edit that cannot apply (a range out of bounds, a version that goes backwards) is rejected
whole with an error in the log, and the document stays as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsprotocol import types

from ..documents import DocumentError

if TYPE_CHECKING:
    from ..server import TramontaneServer


def register(server: TramontaneServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: TramontaneServer, params: types.DidOpenTextDocumentParams) -> None:
        doc = params.text_document
        ls.documents.open(doc.uri, doc.language_id, doc.version, doc.text)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: TramontaneServer, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.completions.cancel(uri)  # the text it was computed for is gone
        try:
            ls.documents.change(uri, params.text_document.version, params.content_changes,
                                ls.position_encoding)
        except DocumentError as e:
            ls.log_to_client(types.MessageType.Error, f"Tramontane: edit rejected: {e}")

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: TramontaneServer, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.completions.forget(uri)
        if ls.backend is not None:
            ls.backend.forget(uri)  # frees the document's prefix cache
        try:
            ls.documents.close(uri)
        except DocumentError as e:
            ls.log_to_client(types.MessageType.Warning, f"Tramontane: {e}")
