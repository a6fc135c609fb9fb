"""The real language server with a scripted chat model, for the Neovim chat's tool steps and
edit proposals (a tiny random model never calls a tool).

Everything but the model is the server's own: `tramontane/chat`, the turn loop, the tool host
(schema checks, `tramontane/runTool` to the editor, time limit), the deltas. The model's turn is
written in the user's last message, a JSON object `{"script": [step, ...]}`; model step k of the
turn (k = the assistant messages after that user message) plays `script[k]`:

  {"text": ["chunk", ...]}                          text deltas
  {"calls": [{"name": ..., "arguments": {...}}]}    tool calls (ids call1, call2, ...)
  {"applyEdit": ApplyWorkspaceEditParams}           a `workspace/applyEdit` request to the
                                                    editor, as `propose_edit` sends one; the
                                                    editor's answer comes back as the text
                                                    "applyEdit -> {json}"

A step past the end of the script answers "(end of script)".

    python -m tests.editors.chat_server
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from lsprotocol import converters, types

from lsp_server.app import create_server
from lsp_server.backends.base import (
    BackendError,
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    End,
    Event,
    TextDelta,
    ToolCall,
    ToolCalls,
)
from lsp_server.cli import serve
from lsp_server.server import TramontaneServer
from lsp_server.settings import Settings
from lsp_server.tokenizer import PromptTokenizer


def _script_step(messages: list[dict[str, Any]]) -> dict[str, Any]:
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    content = messages[last_user]["content"]
    if isinstance(content, list):  # the context is a text part before the user's text
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    script = json.loads(content[content.index("{"):])["script"]
    step = sum(1 for m in messages[last_user:] if m["role"] == "assistant")
    return script[step] if step < len(script) else {"text": ["(end of script)"]}


class ScriptedChat:
    name = "scripted-chat"
    status = BackendStatus("ready", "scripted chat ready")
    tokenizer: PromptTokenizer | None = None

    def __init__(self) -> None:
        self.server: TramontaneServer | None = None
        self.calls = 0

    async def configure(self, settings: Settings) -> None:
        pass

    def forget(self, key: str) -> None:
        pass

    async def close(self) -> None:
        pass

    def complete(self, request: CompletionRequest) -> AsyncIterator[Event]:
        raise BackendError("the scripted chat model does not complete code")

    async def chat(self, request: ChatRequest) -> AsyncIterator[Event]:
        step = _script_step(list(request.messages))
        if "calls" in step:
            calls = []
            for call in step["calls"]:
                self.calls += 1
                calls.append(ToolCall(f"call{self.calls}", call["name"],
                                      json.dumps(call.get("arguments", {}))))
            yield ToolCalls(tuple(calls))
        elif "applyEdit" in step:
            assert self.server is not None
            converter = converters.get_converter()
            params = converter.structure(step["applyEdit"], types.ApplyWorkspaceEditParams)
            answer = await self.server.workspace_apply_edit_async(params)
            yield TextDelta("applyEdit -> " + json.dumps(converter.unstructure(answer),
                                                         sort_keys=True))
        else:
            for text in step["text"]:
                yield TextDelta(text)
        yield End("stop", generated_tokens=1)


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    backend = ScriptedChat()
    server = create_server(backend=backend)
    backend.server = server
    serve(server)
