"""However a remote stream ends, its connection is closed at once, even when cancellations
coincide (issue 14's gap: vLLM generated on to max_tokens behind a stream the server had left).

A reading task can be cancelled twice: the completion's time budget and the HTTP deadline fire
in the same late loop iteration on a starved machine; a newer keystroke supersedes a completion
and the editor's `$/cancelRequest` follows; a chat turn is stopped while its stream closes.
httpcore closed its connection correctly after one `Task.cancel()` but not after a second one
landing while it closed (its close awaits a lock's checkpoint under an anyio shield, which does
not hold off `Task.cancel()`): the socket stayed open and unread, and the connection stayed
ACTIVE in the pool. These tests land the second cancellation at each loop iteration of the
close, in each phase of a request (no answer yet, waiting mid-stream, reading a flood), and
check what the misbehaving server sees (the disconnect), and at the HTTP layer that the pool is
left clean: with a pool of one connection, a connection left ACTIVE makes the next request wait
for the pool until httpx gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from lsp_server.backends import tokenizers
from lsp_server.backends.base import Sampling, ToolCall, ToolSpec
from lsp_server.backends.http import Limits, RemoteClient
from lsp_server.backends.openai import OpenAIBackend
from lsp_server.chat.service import ChatService, ToolOutcome
from lsp_server.completions import BUDGET, CANCELLED, CompletionService, Outcome
from lsp_server.documents import Document
from lsp_server.settings import BackendSettings, CompletionSettings, Settings

from .conftest import FaultyServer

LIMITS = Limits(connect_timeout=2.0, chunk_timeout=60.0, deadline=120.0)
# Loop iterations between the first cancellation and the second: the close takes a few.
GAPS = range(6)


def unique(path: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}id={uuid.uuid4().hex[:8]}"


def pool_of_one(server: FaultyServer) -> RemoteClient:
    """A client whose pool holds one connection (httpx waits 2 s for it: connect_timeout)."""
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    return RemoteClient(server.url, limits=LIMITS, transport=transport)


async def disconnected_within(server: FaultyServer, target: str, seconds: float) -> bool:
    for _ in range(int(seconds / 0.02)):
        if target in server.log()["disconnects"]:
            return True
        await asyncio.sleep(0.02)
    return target in server.log()["disconnects"]


async def started(server: FaultyServer, target: str, first: asyncio.Event) -> None:
    """Until the request is under way: an event read, or (no answer coming) the request seen."""
    for _ in range(500):
        if first.is_set() or server.requests_to(target):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{target} never started")


async def cancel_twice(task: asyncio.Task[None], gap: int) -> None:
    task.cancel()
    for _ in range(gap):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def ok_after(remote: RemoteClient) -> list[str]:
    """A normal request on the same client (its pool of one must be free)."""
    async with remote.stream(unique("/ok"), {}) as events:
        return [c["text"] async for e in events for c in e["choices"]]


@pytest.mark.parametrize("path", ["/stall-headers", "/stall-mid", "/endless?interval=0"])
@pytest.mark.asyncio
async def test_a_second_cancel_during_the_close_still_closes_the_connection(
        faulty: FaultyServer, path: str) -> None:
    """Before the response (no answer yet), waiting mid-stream, and reading a flood."""
    remote = pool_of_one(faulty)
    for gap in GAPS:
        target = unique(path)
        first = asyncio.Event()

        async def read(target: str = target, first: asyncio.Event = first) -> None:
            async with remote.stream(target, {}) as events:
                async for _ in events:
                    first.set()

        task = asyncio.ensure_future(read())
        await started(faulty, target, first)
        await cancel_twice(task, gap)
        assert await disconnected_within(faulty, target, 1.0), f"gap {gap}: left open"
        assert await ok_after(remote) == ["def", " add", "(a, b)", ""], f"gap {gap}"
    await remote.aclose()


# --- the three ways a completion's stream ends, and a chat turn stopped --------------------------

V3 = str(tokenizers.data_folder() / tokenizers.V3)
DOC = Document("file:///w/add.py", "python", 1, "def add(a, b):\n    \n")
CURSOR = len("def add(a, b):\n    ")
# No answer yet (the request waits for its response), and a stream being read (200 events a
# second: a completion's 4096 tokens last 20 s).
ROUTES = ["/stall-headers", "/endless/interval=0.005"]
BUDGET_MS = 300
# The HTTP deadline of a completion: its budget and remote.DEADLINE_MARGIN_S.
DEADLINE_S = BUDGET_MS / 1000 + 1.0


@dataclasses.dataclass
class Completing:
    service: CompletionService
    backend: OpenAIBackend
    settings: CompletionSettings
    target: str  # what the server logs for the request (and its disconnect)


async def completing(server: FaultyServer, route: str, budget_ms: int) -> Completing:
    path = f"{route}/id={uuid.uuid4().hex[:8]}"
    completion = CompletionSettings(max_tokens=4096, time_budget_ms=budget_ms)
    backend = OpenAIBackend()
    await backend.configure(Settings(
        backend=BackendSettings(url=server.url + path, model="tiny", tokenizer=V3),
        completion=completion))
    assert backend.status.state == "ready", backend.status
    return Completing(CompletionService(lambda: backend), backend, completion,
                      f"{path}/completions")


async def under_way(server: FaultyServer, target: str) -> None:
    await started(server, target, asyncio.Event())
    await asyncio.sleep(0.05)  # the endless route's events are being read


async def ended(task: asyncio.Task[Outcome]) -> Outcome | None:
    """The completion's outcome, or None if the editor's cancel came first."""
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return None


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.asyncio
async def test_superseded_then_cancelled_closes_the_connection(
        faulty: FaultyServer, route: str) -> None:
    """A newer keystroke's request supersedes the completion; the editor's `$/cancelRequest`
    for the old request follows while its stream closes (VS Code sends both)."""
    for gap in GAPS:
        run = await completing(faulty, route, 60_000)
        old = asyncio.ensure_future(run.service.complete(DOC, CURSOR, run.settings))
        await under_way(faulty, run.target)
        # The newer request waits in its debounce: it never reaches the server.
        newer = asyncio.ensure_future(run.service.complete(
            DOC, CURSOR, dataclasses.replace(run.settings, debounce_ms=60_000)))
        for _ in range(gap):
            await asyncio.sleep(0)
        old.cancel()
        outcome = await ended(old)
        assert outcome is None or (outcome.text, outcome.reason) == ("", CANCELLED)
        assert await disconnected_within(faulty, run.target, 1.0), f"gap {gap}: left open"
        newer.cancel()
        await ended(newer)
        await run.backend.close()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.asyncio
async def test_the_time_budget_then_a_cancel_closes_the_connection(
        faulty: FaultyServer, route: str) -> None:
    """The budget runs out (the loop held up past it, as on a starved machine) and the
    editor's `$/cancelRequest` arrives while the stream closes."""
    for gap in GAPS:
        run = await completing(faulty, route, BUDGET_MS)
        task = asyncio.ensure_future(run.service.complete(DOC, CURSOR, run.settings))
        await under_way(faulty, run.target)
        time.sleep(BUDGET_MS / 1000)  # blocks the loop: the budget is over when it runs again
        for _ in range(gap):
            await asyncio.sleep(0)
        task.cancel()
        outcome = await ended(task)
        assert outcome is None or outcome.reason == BUDGET or outcome.text
        assert await disconnected_within(faulty, run.target, 1.0), f"gap {gap}: left open"
        await run.backend.close()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.asyncio
async def test_budget_and_deadline_in_one_late_iteration_close_the_connection(
        faulty: FaultyServer, route: str) -> None:
    """The loop held up past both the time budget and the HTTP deadline (budget + 1 s): both
    cancel the reading task when it runs again, as seen under CPU starvation."""
    for _ in range(3):
        run = await completing(faulty, route, BUDGET_MS)
        task = asyncio.ensure_future(run.service.complete(DOC, CURSOR, run.settings))
        await under_way(faulty, run.target)
        time.sleep(DEADLINE_S + 0.2)
        outcome = await task
        assert outcome.reason == BUDGET or outcome.text, outcome
        # The outcome says how late the loop ran the budget's timer: at least the time blocked.
        assert outcome.budget_late_ms is not None
        assert outcome.budget_late_ms >= (DEADLINE_S + 0.2) * 1000 - BUDGET_MS, outcome
        assert await disconnected_within(faulty, run.target, 1.0), "left open"
        await run.backend.close()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.asyncio
async def test_a_cancel_request_closes_the_connection(faulty: FaultyServer, route: str) -> None:
    run = await completing(faulty, route, 60_000)
    task = asyncio.ensure_future(run.service.complete(DOC, CURSOR, run.settings))
    await under_way(faulty, run.target)
    task.cancel()
    assert await ended(task) is None
    assert await disconnected_within(faulty, run.target, 1.0)
    await run.backend.close()


class NoTools:
    @property
    def specs(self) -> Sequence[ToolSpec]:
        return ()

    async def run(self, call: ToolCall) -> ToolOutcome:
        raise AssertionError(f"no tool was offered, {call.name} called")


async def chatting(server: FaultyServer, route: str) -> tuple[ChatService, OpenAIBackend, str]:
    path = f"{route}/id={uuid.uuid4().hex[:8]}"
    backend = OpenAIBackend()
    await backend.configure(Settings(backend=BackendSettings(
        url=server.url + path, model="tiny", tokenizer=V3)))
    assert backend.status.state == "ready", backend.status
    return ChatService(lambda: backend), backend, f"{path}/chat/completions"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.asyncio
async def test_stopping_a_chat_turn_closes_the_connection(faulty: FaultyServer,
                                                          route: str) -> None:
    """The user stops the answer (`$/cancelRequest` of `tramontane/chat`), and a second
    cancellation lands while the stream closes."""
    for gap in GAPS:
        chats, backend, target = await chatting(faulty, route)
        deltas: list[dict[str, Any]] = []
        turn = asyncio.ensure_future(chats.turn(
            "c1", [], [{"role": "user", "content": "Hello"}], NoTools(), Sampling(10**6), 4,
            deltas.append))
        await under_way(faulty, target)
        streaming = route != "/stall-headers"
        assert bool(deltas) == streaming and all(d == {"kind": "text", "text": "x"} for d in deltas)
        await cancel_twice(turn, gap)
        assert await disconnected_within(faulty, target, 1.0), f"gap {gap}: left open"
        await backend.close()


@pytest.mark.asyncio
async def test_a_chat_turn_that_fails_while_streaming_closes_the_connection(
        faulty: FaultyServer) -> None:
    """Whatever ends the turn (here the editor's side of the deltas fails), the stream is closed
    at once (the turn closes its backend's stream itself, before the error leaves it)."""
    chats, backend, target = await chatting(faulty, "/endless/interval=0.005")

    def gone(delta: dict[str, Any]) -> None:
        raise ConnectionResetError("the editor went away")

    with pytest.raises(ConnectionResetError) as caught:
        await chats.turn("c1", [], [{"role": "user", "content": "Hello"}], NoTools(),
                         Sampling(10**6), 4, gone)
    assert await disconnected_within(faulty, target, 1.0)
    assert str(caught.value) == "the editor went away"  # the error (and its frames) still held
    await backend.close()
