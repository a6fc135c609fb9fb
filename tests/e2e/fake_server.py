"""The real language server with a scripted backend instead of a model, for timing-sensitive
end-to-end tests (cancellation, supersession) and golden tests of post-processing over the wire.

Environment:
  FAKE_TOKENS  JSON list of the texts of the tokens every completion streams
  FAKE_DELAY   seconds per token (default 0)
  FAKE_LOG     a file where the backend appends one line per request:
               "<n> <document> steps=<k> <finish reason>"
  FAKE_RAISE   if set, the backend raises RuntimeError(FAKE_RAISE) (an unexpected failure)
  FAKE_PRINT   if set, the backend prints to stdout, from Python and through fd 1 directly
  FAKE_BLOCK   seconds the first step blocks the engine thread, deaf to cancellation (a compile
               or a long prefill); "scripted backend: blocking" goes to stderr when it starts
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine
from engine.tiny import tokenizer_source
from lsp_server.backend import Events, GenerationRequest
from lsp_server.cli import serve
from lsp_server.server import create_server

log = logging.getLogger("fake_server")


class ScriptedBackend:
    name = "scripted"

    def __init__(self) -> None:
        self.tokenizer = MistralTokenizer.from_file(str(tokenizer_source("v3")))
        self.texts: list[str] = json.loads(os.environ.get("FAKE_TOKENS", '["x"]'))
        self.delay = float(os.environ.get("FAKE_DELAY", "0"))
        self.log = Path(os.environ["FAKE_LOG"]) if "FAKE_LOG" in os.environ else None
        self.requests = 0

    def forget(self, document: str) -> None:
        pass

    def stream(self, request: GenerationRequest, cancel: engine.CancellationToken) -> Events:
        self.requests += 1
        if "FAKE_PRINT" in os.environ:
            print("stray print from a library")
            os.write(1, b"stray native write\n")
        if "FAKE_RAISE" in os.environ:
            raise RuntimeError(os.environ["FAKE_RAISE"])
        if "FAKE_BLOCK" in os.environ:
            log.warning("scripted backend: blocking the engine thread for %s s",
                        os.environ["FAKE_BLOCK"])
            time.sleep(float(os.environ["FAKE_BLOCK"]))
        steps, reason = 0, "length"
        try:
            for text in self.texts[: request.sampling.max_tokens]:
                if cancel.cancelled:
                    reason = "cancelled"
                    break
                time.sleep(self.delay)  # one "decode step"
                steps += 1
                yield engine.TokenEvent(0, 0.0, text)
            yield engine.EndEvent(reason, len(request.prompt), steps, 0.0, 0.0)  # type: ignore[arg-type]
        finally:
            if self.log is not None:
                with self.log.open("a") as f:
                    f.write(f"{self.requests} {request.document} steps={steps} {reason}\n")


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    serve(create_server(backend=ScriptedBackend()))  # type: ignore[arg-type]
