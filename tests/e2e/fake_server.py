"""The real language server with a scripted backend instead of a model, for timing-sensitive
end-to-end tests (cancellation, supersession) and golden tests of post-processing over the wire.

Environment:
  FAKE_TOKENS  JSON list of the texts of the tokens every completion streams
  FAKE_DELAY   seconds per token (default 0)
  FAKE_LOG     a file where the backend appends one line per request:
               "<n> <document> steps=<k> <finish reason>"
  FAKE_RAISE   if set, the backend raises RuntimeError(FAKE_RAISE) (an unexpected failure)
  FAKE_PRINT   if set, the backend prints to stdout, from Python and through fd 1 directly
  FAKE_CHAT    JSON list of the assistant's turns, replayed one per model step of every chat:
               {"text": "..."} answers; {"calls": [{"name", "arguments": {...}}]} calls tools;
               {"raw": "..."} writes "..." after the [TOOL_CALLS] token (a malformed call);
               {"markers": n} writes n [TOOL_CALLS] tokens (a flood).
               Each turn is encoded by mistral-common (v3) and decoded back by the local
               backend's own chat decoder, as the model's tokens would be.
  FAKE_CHAT_FILE  a file holding FAKE_CHAT's JSON (for scripts too large for the environment)
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
from typing import Any

from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine
from engine.checkpoints.tiny import tokenizer_source
from lsp_server.app import create_server
from lsp_server.backends.base import (
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    End,
    EndReason,
    Event,
    TextDelta,
)
from lsp_server.backends.jobs import ChatTokens
from lsp_server.chat.prompt import encode_chat
from lsp_server.chat.tools import BUILTIN_TOOLS
from lsp_server.cli import serve
from lsp_server.settings import Settings
from lsp_server.tokenizer import PromptTokenizer

log = logging.getLogger("tests.e2e.fake_server")


def scripted_tokens(tokenizer: MistralTokenizer, turn: dict[str, Any]) -> list[int]:
    """The tokens a model writes for `turn`: mistral-common's encoding of that assistant
    message (after a user message), up to its EOS. `tokenizer` is in fine-tuning mode."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    if "markers" in turn:
        return [raw.get_special_token("[TOOL_CALLS]")] * int(turn["markers"])
    if "raw" in turn:
        return [raw.get_special_token("[TOOL_CALLS]"), *raw.encode(turn["raw"], False, False)]
    user = UserMessage(content="scripted")
    calls = [MistralToolCall(id=f"call{i:05d}", function=FunctionCall(
        name=call["name"], arguments=json.dumps(call["arguments"])))
        for i, call in enumerate(turn.get("calls", []))]
    message = AssistantMessage(content=turn.get("text") if not calls else None,
                               tool_calls=calls or None)
    tools = [Tool(function=Function(name=s.name, description=s.description,
                                    parameters=s.parameters)) for s in BUILTIN_TOOLS.values()]
    # The prompt: the user's message alone, then the assistant's (last, or before its tool
    # results when it calls tools).
    prompt = tokenizer.encode_chat_completion(ChatCompletionRequest(
        messages=[user, AssistantMessage(content="x")], tools=tools)).tokens
    prompt = prompt[:prompt.index(raw.get_special_token("[/INST]")) + 1]
    full = tokenizer.encode_chat_completion(ChatCompletionRequest(
        messages=[user, message], tools=tools)).tokens
    rest = full[len(prompt):]
    return rest[:rest.index(raw.eos_id)]


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
        self.chat_steps: dict[str, int] = {}
        # The same tokenizer in mistral-common's fine-tuning mode, which encodes an assistant
        # message as the last one: how the scripted turns become the tokens a model writes.
        self.writer = MistralTokenizer.from_file(str(tokenizer_source("v3")),
                                                 ValidationMode.finetuning)

    async def configure(self, settings: Settings) -> None:
        pass

    def forget(self, key: str) -> None:
        pass

    async def close(self) -> None:
        pass

    async def chat(self, request: ChatRequest) -> AsyncIterator[Event]:
        assert self.tokenizer is not None
        mistral = self.tokenizer.mistral
        # The prompt as the local backend builds it: mistral-common refuses what it would.
        prompt = encode_chat(mistral, request.messages, request.tools, None)  # no vision
        step = self.chat_steps.get(request.key, 0)
        self.chat_steps[request.key] = step + 1
        script = (Path(os.environ["FAKE_CHAT_FILE"]).read_text() if "FAKE_CHAT_FILE" in os.environ
                  else os.environ.get("FAKE_CHAT", '[{"text": "ok"}]'))
        turns: list[dict[str, Any]] = json.loads(script)
        tokens = scripted_tokens(self.writer, turns[min(step, len(turns) - 1)])
        decoder = ChatTokens(mistral)
        generated = 0
        for token in tokens:
            if self.delay:
                await asyncio.sleep(self.delay)
            generated += 1
            text = decoder.feed(engine.TokenEvent(token, 0.0, ""))
            if text:
                yield TextDelta(text)
        rest, extra = decoder.finish("")
        if rest:
            yield TextDelta(rest)
        for event in extra:
            yield event
        yield End("stop", len(prompt.tokens), generated_tokens=generated)

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
