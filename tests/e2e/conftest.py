"""End-to-end fixtures: the real server over stdio under pytest-lsp, with VS Code's or Neovim's
client capabilities, on a tiny random checkpoint on disk."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.conftest import CheckpointFactory

SERVER = [sys.executable, "-m", "lsp_server", "--stdio", "--log-level", "INFO"]
MODEL_SHAPE: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   hidden_dim=128)


@pytest.fixture(scope="session")
def tiny_model(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint("native", seed=3, **MODEL_SHAPE)


class Statuses:
    """Collects `tramontane/status` notifications and waits for a given state."""

    def __init__(self, client: LanguageClient) -> None:
        self.seen: list[dict[str, Any]] = []

        def record(params: Any) -> None:
            self.seen.append(params if isinstance(params, dict) else params._asdict())

        client.feature("tramontane/status")(record)

    async def wait_for(self, state: str, timeout: float = 60.0) -> dict[str, Any]:
        import asyncio

        async def poll() -> dict[str, Any]:
            while True:
                for status in reversed(self.seen):
                    if status.get("state") == state:
                        return status
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(poll(), timeout)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient) -> AsyncIterator[LanguageClient]:
    yield lsp_client
    if lsp_client.capabilities is None:
        # The test failed before initializing: end the server by closing its stdin (pytest-lsp
        # would otherwise wait for it forever).
        server = lsp_client._server
        if server is not None and server.stdin is not None:
            server.stdin.close()
        return
    await lsp_client.shutdown_session()


async def start(client: LanguageClient, options: dict[str, Any] | None,
                capabilities: str = "visual-studio-code") -> Statuses:
    statuses = Statuses(client)
    if isinstance(options, dict) and "model" in options:
        # Compiling the decode step takes seconds per server start; tests that want it say so.
        options = {"compile": False, **options}
    await client.initialize_session(types.InitializeParams(
        capabilities=pytest_lsp.client_capabilities(capabilities),
        initialization_options=options,
    ))
    return statuses
