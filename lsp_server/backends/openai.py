"""vLLM, and any server that speaks OpenAI's `/v1/completions` and `/v1/chat/completions`.

- FIM: the prompt goes as token ids, mistral-common's `[BOS] [SUFFIX] suffix [PREFIX] prefix`
  (the `tokens` of the request, built with `backend.tokenizer`). vLLM refuses a text `suffix`
  for Mistral models; ids also make the prompt exactly what the local engine would run, so a
  greedy completion is the same text on both.
- Chat: the messages and the tools' schemas as JSON; the server renders them with the model's
  tokenizer (vLLM: `--tokenizer-mode mistral`) and streams text and tool calls.

vLLM 0.32 defect, repaired here: a *forced* tool call (`tool_choice` naming a function),
streamed, has arguments that start with a stray ':' (`:{"path":"main.py"}`; the non-streamed
answer to the same request has none). The repair is safe: JSON text never starts with ':', so
arguments that do are invalid as they stand, and the ':' is dropped only when what follows is a
JSON object; anything else is left for the chat host to refuse, as for local calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from . import openai_wire, wire
from .base import CompletionRequest, ToolCall
from .remote import CompletionCall, RemoteBackend


def repair_arguments(arguments: str) -> str:
    """`arguments` without vLLM's stray leading ':' (see the module's docstring)."""
    if not arguments.startswith(":"):
        return arguments
    try:
        value = json.loads(arguments[1:])
    except (json.JSONDecodeError, RecursionError):
        return arguments
    return arguments[1:] if isinstance(value, dict) else arguments


class OpenAIBackend(RemoteBackend):
    kind: ClassVar[str] = "openai"

    def completion_call(self, model: str, request: CompletionRequest,
                        sampling: wire.Sampling) -> CompletionCall:
        parser = openai_wire.CompletionStream(self._label())
        body = openai_wire.completion_request(model, request.tokens, sampling)
        return CompletionCall(openai_wire.COMPLETIONS_PATH, body, parser.feed, parser.finish)

    def chat_call(self, model: str, messages: Sequence[wire.Message], tools: Sequence[wire.Tool],
                  sampling: wire.Sampling) -> tuple[str, dict[str, Any]]:
        return openai_wire.CHAT_PATH, openai_wire.chat_request(model, messages, sampling, tools)

    def tool_call(self, call: wire.ToolCall) -> ToolCall:
        fixed = super().tool_call(call)
        return ToolCall(fixed.id, fixed.name, repair_arguments(fixed.arguments))

    def _label(self) -> str:
        return self._client.label if self._client is not None else self.kind
