"""The real language server with a scripted backend instead of a model, for timing-sensitive
end-to-end tests (cancellation, supersession) and golden tests of post-processing over the wire.

Environment:
  FAKE_TOKENS  JSON list of the texts of the tokens every completion streams
  FAKE_DELAY   seconds per token (default 0)
  FAKE_LOG     a file where the backend appends one line per request:
               "<n> <document> steps=<k> <finish reason>"
  FAKE_RAISE   if set, the backend raises RuntimeError(FAKE_RAISE) (an unexpected failure)
  FAKE_PRINT   if set, the backend prints to stdout, from Python and through fd 1 directly
  FAKE_LOADING if set, the backend stays `loading` (no tokenizer): completions come back empty
  FAKE_BLOCK   seconds the first step blocks a worker thread, deaf to cancellation (a compile
               or a long prefill on the engine thread); "scripted backend: blocking" goes to
               stderr when it starts
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine.checkpoints.tiny import tokenizer_source
from lsp_server.app import create_server
from lsp_server.backends.base import (
    BackendError,
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    End,
    EndReason,
    Event,
    TextDelta,
)
from lsp_server.cli import serve
from lsp_server.settings import Settings
from lsp_server.tokenizer import PromptTokenizer

log = logging.getLogger("tests.e2e.fake_server")


class ScriptedBackend:
    name = "scripted"

    def __init__(self) -> None:
        self.tokenizer: PromptTokenizer | None = PromptTokenizer(
            MistralTokenizer.from_file(str(tokenizer_source("v3"))))
        self.status = BackendStatus("ready", "scripted ready")
        if "FAKE_LOADING" in os.environ:
            self.tokenizer = None
            self.status = BackendStatus("loading", "Loading the scripted model")
        self.texts: list[str] = json.loads(os.environ.get("FAKE_TOKENS", '["x"]'))
        self.delay = float(os.environ.get("FAKE_DELAY", "0"))
        self.log = Path(os.environ["FAKE_LOG"]) if "FAKE_LOG" in os.environ else None
        self.requests = 0

    async def configure(self, settings: Settings) -> None:
        pass

    def forget(self, key: str) -> None:
        pass

    async def close(self) -> None:
        pass

    def chat(self, request: ChatRequest) -> AsyncIterator[Event]:
        raise BackendError("the scripted backend does not chat")

    async def complete(self, request: CompletionRequest) -> AsyncIterator[Event]:
        self.requests += 1
        if "FAKE_PRINT" in os.environ:
            print("stray print from a library")
            os.write(1, b"stray native write\n")
        if "FAKE_RAISE" in os.environ:
            raise RuntimeError(os.environ["FAKE_RAISE"])
        if "FAKE_BLOCK" in os.environ:
            log.warning("scripted backend: blocking the engine thread for %s s",
                        os.environ["FAKE_BLOCK"])
            await asyncio.get_running_loop().run_in_executor(
                None, time.sleep, float(os.environ["FAKE_BLOCK"]))
        steps, reason = 0, "cancelled"
        try:
            for text in self.texts[: request.sampling.max_tokens]:
                await asyncio.sleep(self.delay)  # one "decode step"
                steps += 1
                yield TextDelta(text)
                if request.stop is not None and request.stop(text):
                    reason = "stop"
                    break
            else:
                reason = "length"
            yield self._end(request, reason, steps)
        finally:
            if reason == "cancelled":
                self._end(request, reason, steps)
            if self.log is not None:
                with self.log.open("a") as f:
                    f.write(f"{self.requests} {request.key} steps={steps} {reason}\n")

    @staticmethod
    def _end(request: CompletionRequest, reason: EndReason, steps: int) -> End:
        end = End(reason, len(request.tokens), generated_tokens=steps,
                  stopped_ms=0.0 if reason == "cancelled" else None)
        if request.on_end is not None:
            request.on_end(end)
        return end


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    serve(create_server(backend=ScriptedBackend()))
