"""textDocument/inlineCompletion (LSP 3.18): ghost text at the cursor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsprotocol import types

from ..convert import lsp_inline_completion_list
from .common import complete_at

if TYPE_CHECKING:
    from ..server import TramontaneServer


def register(server: TramontaneServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: TramontaneServer, params: types.InlineCompletionParams
                                ) -> types.InlineCompletionList:
        outcome = await complete_at(ls, params.text_document.uri, params.position)
        return lsp_inline_completion_list(outcome, params.position)
