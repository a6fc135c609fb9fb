"""workspace/didChangeConfiguration: new settings, and a new model if they name one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsprotocol import types

from ..settings import merge_settings, settings_payload

if TYPE_CHECKING:
    from ..server import TramontaneServer


def register(server: TramontaneServer) -> None:
    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: TramontaneServer,
                                 params: types.DidChangeConfigurationParams) -> None:
        ls.settings, warnings = merge_settings(ls.settings, settings_payload(params.settings))
        for warning in warnings:
            ls.show(types.MessageType.Warning, f"Tramontane: {warning}")
        ls.completions.forget_shown()
        ls.configure_backend()
