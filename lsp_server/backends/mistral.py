"""Mistral's API (https://api.mistral.ai/v1): Codestral's FIM endpoint and the chat endpoint.

- FIM: `/v1/fim/completions` takes the text itself (`prompt`: the prefix window, `suffix`: the
  suffix window) and builds the FIM prompt on the server, so the local tokenizer only sizes the
  windows (see tokenizers.py). The same windows and post-processing as every backend apply.
- Chat: `/v1/chat/completions` with `tools`, streamed; images as `data:` URIs; tool calls come
  whole, ids of 9 characters, sent back unchanged with their results.
- The key: `backend.apiKeyEnv` names the variable that holds it (e.g. MISTRAL_API_KEY).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from . import mistral_wire, wire
from .base import CompletionRequest
from .remote import CompletionCall, RemoteBackend

API_URL = "https://api.mistral.ai/v1"


class MistralBackend(RemoteBackend):
    kind: ClassVar[str] = "mistral"
    text_fim: ClassVar[bool] = True

    def completion_call(self, model: str, request: CompletionRequest,
                        sampling: wire.Sampling) -> CompletionCall:
        parser = mistral_wire.FimStream(self._client.label if self._client else self.kind)
        body = mistral_wire.fim_request(model, request.prefix, request.suffix, sampling)

        def finish() -> wire.Finish:
            return parser.finish()[1]

        return CompletionCall(mistral_wire.FIM_PATH, body, parser.feed, finish)

    def chat_call(self, model: str, messages: Sequence[wire.Message], tools: Sequence[wire.Tool],
                  sampling: wire.Sampling) -> tuple[str, dict[str, Any]]:
        return mistral_wire.CHAT_PATH, mistral_wire.chat_request(model, messages, sampling, tools)
