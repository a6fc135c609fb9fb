"""The server starts over stdio under a real LSP client and answers with its identity."""

from __future__ import annotations

import sys

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

import lsp_server

SERVER = ClientServerConfig(server_command=[sys.executable, "-m", "lsp_server", "--stdio"])


@pytest_lsp.fixture(config=SERVER)
async def client(lsp_client: LanguageClient):  # type: ignore[no-untyped-def]
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_initialize_reports_name_and_version(client: LanguageClient) -> None:
    result = await client.initialize_session(
        types.InitializeParams(capabilities=pytest_lsp.client_capabilities("visual-studio-code"))
    )
    assert result.server_info is not None
    assert (result.server_info.name, result.server_info.version) == (
        "tramontane", lsp_server.__version__)
