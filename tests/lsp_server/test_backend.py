"""LocalBackend: the model's life follows the settings (ready before the compiled step, caches and
the compiled step follow the prompt budgets), requests stream through the engine thread."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import engine
from lsp_server.backends.base import BackendStatus, CompletionRequest, End, Sampling, TextDelta
from lsp_server.backends.local import LocalBackend, context_tokens
from lsp_server.scheduler import Scheduler
from lsp_server.settings import CacheSettings, CompletionSettings, Settings
from tests.conftest import CheckpointFactory

SMALL = CompletionSettings(prefix_tokens=100, suffix_tokens=50, max_tokens=16)
LARGE = CompletionSettings(prefix_tokens=600, suffix_tokens=50, max_tokens=16)
SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)


def test_context_tokens_round_the_budgets_up_to_256() -> None:
    assert context_tokens(SMALL) == 256  # 100 + 50 + 16 + 16 special tokens
    assert context_tokens(LARGE) == 768
    assert context_tokens(CompletionSettings()) == 2304  # the defaults: 1536 + 512 + 128 + 16


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[tuple[LocalBackend, list[BackendStatus]]]:
    scheduler = Scheduler()
    statuses: list[BackendStatus] = []
    yield LocalBackend(scheduler, statuses.append, eager_step=True), statuses
    scheduler.stop()


async def wait_for(statuses: list[BackendStatus], fast: bool, timeout: float = 60) -> None:
    async def poll() -> None:
        while not (statuses and statuses[-1].details.get("fastDecode") is fast):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def complete(backend: LocalBackend, key: str, tokens: list[int]) -> list[object]:
    request = CompletionRequest(key=key, prefix="", suffix="", tokens=tuple(tokens),
                                sampling=Sampling(max_tokens=3))
    return [event async for event in backend.complete(request)]


@pytest.mark.asyncio
async def test_ready_on_the_eager_path_then_the_compiled_step_is_swapped_in(
        backend: tuple[LocalBackend, list[BackendStatus]],
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    local, statuses = backend
    folder = make_checkpoint("native", **SHAPE)
    # The step is built on a thread of its own; held here until the ready status is seen (an
    # eager step is built in no time, and could be swapped in before `configure` returns).
    release = threading.Event()
    build = engine.compile_decode_step

    def held(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        return build(*args, **kwargs)

    monkeypatch.setattr(engine, "compile_decode_step", held)
    await local.configure(Settings(model=str(folder), completion=SMALL,
                                   cache=CacheSettings(budget_mib=64)))
    assert [s.state for s in statuses] == ["loading", "ready"]
    assert statuses[1].details == {"fastDecode": False}
    assert "compiling the fast decode step" in statuses[1].message
    release.set()
    await wait_for(statuses, fast=True)
    assert statuses[-1].message == (f"{folder.name} ready (torch.float32, cpu), fast decode "
                                    "step in use")
    model = local.model
    assert model is not None and model.decoder is not None
    assert model.decoder.max_seq_len == 256 and model.decoder.batch_size == 1
    # The loaded model's objects are frozen: a full collection (~200 ms over a real model's
    # and tokenizer's objects) does not walk them.
    walked = gc.get_objects()
    assert gc.get_freeze_count() > 10_000
    assert not any(o is model.tokenizer or o is model.module for o in walked)

    # New budgets: new caches at once (eager meanwhile), a new compiled step for them.
    await local.configure(Settings(model=str(folder), completion=LARGE,
                                   cache=CacheSettings(budget_mib=64)))
    await wait_for(statuses, fast=True)
    assert model.decoder is not None and model.decoder.max_seq_len == 768
    events = await complete(local, "file:///a.py", [1, 5, 6, 7])
    assert isinstance(events[-1], End) and events[-1].prompt_tokens == 4
    assert all(isinstance(e, TextDelta) for e in events[:-1])


@pytest.mark.asyncio
async def test_documents_and_adapters_get_their_own_caches(
        backend: tuple[LocalBackend, list[BackendStatus]],
        make_checkpoint: CheckpointFactory) -> None:
    local, _ = backend
    model = engine.load(make_checkpoint("native", **SHAPE))
    await local.adopt(model, Settings(compile=False, completion=SMALL,
                                      cache=CacheSettings(budget_mib=64)))
    for uri in ("file:///a.py", "file:///b.py"):
        await complete(local, uri, [1, 5, 6, 7])
    again = await complete(local, "file:///a.py", [1, 5, 6, 7, 8])
    end = again[-1]
    assert isinstance(end, End) and end.reused_tokens == 4  # the prompt and its fed-back token
    local.forget("file:///a.py")
    after = await complete(local, "file:///a.py", [1, 5, 6, 7, 8])
    assert isinstance(after[-1], End) and after[-1].reused_tokens == 0


@pytest.mark.asyncio
async def test_a_model_that_cannot_load_is_an_error_status(
        backend: tuple[LocalBackend, list[BackendStatus]], tmp_path: Path) -> None:
    local, statuses = backend
    await local.configure(Settings(model=str(tmp_path / "missing")))
    assert [s.state for s in statuses] == ["loading", "error"]
    assert statuses[-1].message == (f"could not load the model: {tmp_path / 'missing'}: model "
                                    "folder not found")
    assert local.tokenizer is None

