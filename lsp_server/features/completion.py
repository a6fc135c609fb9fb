"""textDocument/completion: the same completion as one item, for clients without inline
completion (Helix, older Neovim, Emacs eglot)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsprotocol import types

from ..convert import lsp_completion_list
from .common import complete_at

if TYPE_CHECKING:
    from ..server import TramontaneServer


def register(server: TramontaneServer) -> None:
    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    async def completion(ls: TramontaneServer, params: types.CompletionParams
                         ) -> types.CompletionList:
        outcome = await complete_at(ls, params.text_document.uri, params.position)
        return lsp_completion_list(outcome, params.position)
