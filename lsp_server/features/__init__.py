"""One module per LSP method (or family of notifications); each has `register(server)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import chat, completion, configuration, inline_completion, lifecycle, text_sync

if TYPE_CHECKING:
    from ..server import TramontaneServer


def register_all(server: TramontaneServer) -> None:
    for module in (lifecycle, configuration, text_sync, inline_completion, completion, chat):
        module.register(server)
