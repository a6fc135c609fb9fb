"""initialize, initialized, shutdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsprotocol import types

from ..settings import merge_settings

if TYPE_CHECKING:
    from ..server import TramontaneServer


def register(server: TramontaneServer) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: TramontaneServer, params: types.InitializeParams) -> None:
        # Warnings are shown once the client is ready to receive them (after `initialized`).
        ls.settings, ls.pending_warnings = merge_settings(ls.settings,
                                                          params.initialization_options)

    @server.feature(types.INITIALIZED)
    def initialized(ls: TramontaneServer, params: types.InitializedParams) -> None:
        for warning in ls.pending_warnings:
            ls.show(types.MessageType.Warning, f"Tramontane: {warning}")
        ls.pending_warnings = []
        ls.configure_backend()

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: TramontaneServer, params: None) -> None:
        ls.completions.cancel_all()
