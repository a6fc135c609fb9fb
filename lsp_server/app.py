"""create_server(): the server with its features registered (the composition root: the only
module that knows both the server and every feature)."""

from __future__ import annotations

from .backends.base import Backend
from .features import register_all
from .server import TramontaneServer
from .settings import Settings


def create_server(defaults: Settings | None = None,
                  backend: Backend | None = None) -> TramontaneServer:
    server = TramontaneServer(defaults, backend)
    register_all(server)
    return server
