"""The completion pipeline in this process (the server's own classes: prompt windows, the local
backend on its engine thread, post-processing), to compute what the server must answer."""

from __future__ import annotations

import asyncio
import concurrent.futures

import engine
from lsp_server.backends.local import LocalBackend
from lsp_server.completions import CompletionService, Outcome
from lsp_server.documents import Document
from lsp_server.scheduler import Scheduler
from lsp_server.settings import CacheSettings, CompletionSettings, Settings


def complete_in_process(model: engine.Model, document: Document, cursor: int,
                        completion: CompletionSettings) -> Outcome:
    async def run() -> Outcome:
        scheduler = Scheduler()
        try:
            backend = LocalBackend(scheduler)
            await backend.adopt(model, Settings(compile=False, completion=completion,
                                                cache=CacheSettings(enabled=False)))
            service = CompletionService(lambda: backend)
            return await service.complete(document, cursor, completion)
        finally:
            scheduler.stop()

    # A loop of its own on another thread: callers may be inside a running loop (async tests).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()
