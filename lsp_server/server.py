"""create_server(): build the pygls server and register its features.

This is the skeleton the language-server issue grows: it starts, answers `initialize` with
its name and version, and shuts down cleanly. Completion features are registered here later.
"""

from __future__ import annotations

from pygls.lsp.server import LanguageServer

from . import __version__


def create_server() -> LanguageServer:
    return LanguageServer("tramontane", __version__)
