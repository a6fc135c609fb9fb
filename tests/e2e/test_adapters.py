"""LoRA adapters through the server: loaded from the settings beside the model, chosen per
workspace with `completion.adapter`, each with its own prefix cache; a broken one is reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import engine
from lsp_server.documents import Document
from lsp_server.settings import CompletionSettings
from tests.e2e.conftest import MODEL_SHAPE
from tests.e2e.rpc import RawServer
from tests.e2e.test_protocol import inline, open_doc
from tests.engine.test_lora import adapter_weights, write_adapter
from tests.pipeline import complete_in_process

DOC = "file:///w/a.py"
TEXT = "def add(a, b):\n    return foo()\n\nprint(add(1, 2))\n"
CURSOR = {"line": 2, "character": 0}
COMPLETION = {"maxTokens": 12, "timeBudgetMs": 60000}


def pipeline(model_dir: Path, adapter_dir: Path, adapter: str | None) -> str:
    model = engine.load(model_dir)
    model.load_lora(adapter_dir, name="py")
    settings = CompletionSettings(max_tokens=12, time_budget_ms=60000, adapter=adapter)
    doc = Document(DOC, "python", 1, TEXT)
    return complete_in_process(model, doc, TEXT.index("\n\nprint") + 1, settings).text


def messages(server: RawServer) -> list[dict[str, Any]]:
    return [n["params"] for n in server.notifications
            if n.get("method") == "window/showMessage"]


def test_completions_run_with_the_adapter_the_settings_choose(tiny_model: Path,
                                                              tmp_path: Path) -> None:
    adapter_dir = write_adapter(tmp_path / "py", adapter_weights(MODEL_SHAPE, seed=5))
    with_adapter = pipeline(tiny_model, adapter_dir, "py")
    base = pipeline(tiny_model, adapter_dir, None)
    assert with_adapter != base  # the adapter changes what this random model writes
    server = RawServer()
    try:
        server.initialize({"model": str(tiny_model), "compile": False,
                           "adapters": {"py": str(adapter_dir)},
                           "completion": {**COMPLETION, "adapter": "py"}})
        server.wait_for_status("ready")
        open_doc(server, TEXT)
        reply = server.response(inline(server, CURSOR), timeout=60)
        assert reply["result"]["items"][0]["insertText"] == with_adapter
        # Another workspace's settings: the base model, for the same document.
        server.notify("workspace/didChangeConfiguration",
                      {"settings": {"completion": {"adapter": None}}})
        reply = server.response(inline(server, CURSOR), timeout=60)
        assert reply["result"]["items"][0]["insertText"] == base
        server.notify("workspace/didChangeConfiguration",
                      {"settings": {"completion": {"adapter": "py"}}})
        reply = server.response(inline(server, CURSOR), timeout=60)
        assert reply["result"]["items"][0]["insertText"] == with_adapter
        assert messages(server) == []
    finally:
        server.close()


def test_an_adapter_that_cannot_load_is_reported_and_the_server_goes_on(
        tiny_model: Path, tmp_path: Path) -> None:
    server = RawServer()
    try:
        server.initialize({"model": str(tiny_model), "compile": False,
                           "adapters": {"gone": str(tmp_path / "missing")},
                           "completion": COMPLETION})
        server.wait_for_status("ready")
        open_doc(server, TEXT)
        reply = server.response(inline(server, CURSOR), timeout=60)
        assert "result" in reply
        (shown,) = messages(server)
        assert shown["type"] == 1
        assert shown["message"].startswith("Tramontane: LoRA adapter 'gone' not loaded: ")
        assert "missing" in shown["message"]
    finally:
        server.close()
