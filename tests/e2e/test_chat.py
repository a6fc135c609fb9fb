"""`tramontane/chat` over stdio against the real server on tiny random checkpoints: streamed
deltas, follow-up turns reusing the chat's cache, cancellation, and the errors a model that
cannot do what is asked gets."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import CheckpointFactory
from tests.e2e.conftest import MODEL_SHAPE
from tests.e2e.rpc import RawServer
from tests.e2e.test_protocol import open_doc
from tests.engine.test_images import png_claiming

CHAT = "tramontane/chat"
PNG_1X1 = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42m"
           "NkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


def start(model: Path, **chat: Any) -> RawServer:
    server = RawServer()
    server.initialize({"model": str(model), "compile": False,
                       "chat": {"maxTokens": 24, "temperature": 0.0, **chat}})
    server.wait_for_status("ready", timeout=120)
    return server


@pytest.fixture
def server(tiny_model: Path) -> Iterator[RawServer]:
    server = start(tiny_model)
    yield server
    server.close()


def deltas(server: RawServer, chat_id: str) -> list[dict[str, Any]]:
    return [n["params"] for n in server.notifications
            if n.get("method") == "tramontane/chatDelta" and n["params"]["chatId"] == chat_id]


def ask(server: RawServer, chat_id: str, messages: list[dict[str, Any]],
        **extra: Any) -> dict[str, Any]:
    return server.response(server.request(CHAT, {"chatId": chat_id, "messages": messages,
                                                 "tools": False, **extra}), timeout=120)


def test_an_answer_streams_in_order_and_equals_the_final_message(server: RawServer) -> None:
    reply = ask(server, "c1", [{"role": "user", "content": "Write a function that adds."}])
    result = reply["result"]
    texts = [d["text"] for d in deltas(server, "c1")]
    assert texts and all(d["kind"] == "text" for d in deltas(server, "c1"))
    assert "".join(texts) == result["message"]["content"]
    assert result["message"]["role"] == "assistant"
    assert result["messages"] == [{"role": "assistant", "content": result["message"]["content"]}]
    assert result["userMessage"] == {"role": "user", "content": "Write a function that adds."}
    assert result["finishReason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["reusedTokens"] == 0 and usage["promptTokens"] > 5
    assert usage["generatedTokens"] == len(texts) or usage["generatedTokens"] >= len(texts)


def test_a_follow_up_turn_reuses_the_chat_cache_and_chat_close_frees_it(
        server: RawServer) -> None:
    first = [{"role": "user", "content": "Hello there."}]
    one = ask(server, "c2", first)["result"]
    history = [one["userMessage"], *one["messages"],
               {"role": "user", "content": "And now?"}]
    two = ask(server, "c2", history)["result"]
    assert two["usage"]["reusedTokens"] >= one["usage"]["promptTokens"]
    server.notify("tramontane/chatClose", {"chatId": "c2"})
    three = ask(server, "c2", history)["result"]
    assert three["usage"]["reusedTokens"] == 0
    assert three["message"] == two["message"]  # greedy: the same answer, recomputed


def test_context_attaches_the_document_to_the_user_message(server: RawServer) -> None:
    open_doc(server, "def add(a, b):\n    return a + b\n", uri="file:///w/add.py")
    reply = ask(server, "c3", [{"role": "user", "content": "Explain this."}],
                context={"uri": "file:///w/add.py",
                         "range": {"start": {"line": 1, "character": 0},
                                   "end": {"line": 2, "character": 0}}})
    assert reply["result"]["userMessage"] == {
        "role": "user",
        "content": "/w/add.py, lines 2-3:\n```python\n    return a + b\n```\n\nExplain this."}


def test_cancel_answers_request_cancelled_and_the_server_goes_on(tiny_model: Path) -> None:
    server = start(tiny_model, maxTokens=4000)
    try:
        msg = server.request(CHAT, {"chatId": "c4", "tools": False,
                                    "messages": [{"role": "user", "content": "Go on."}]})
        deadline = time.monotonic() + 60
        while not deltas(server, "c4"):
            server.notifications.append(server.next_frame(max(0.1, deadline - time.monotonic())))
        server.notify("$/cancelRequest", {"id": msg})
        assert server.response(msg, timeout=30)["error"]["code"] == -32800
        reply = ask(server, "c5", [{"role": "user", "content": "Hi."}],
                    sampling={"maxTokens": 3})
        assert reply["result"]["usage"]["generatedTokens"] <= 3
    finally:
        server.close()


@pytest.mark.parametrize("params, message", [
    ({"chatId": "x", "messages": []}, "messages must hold 1 to 4096 messages"),
    ({"chatId": "x", "messages": [{"role": "robot", "content": "hi"}]},
     "messages[0].role must be one of system, user, assistant, tool, got 'robot'"),
    ({"chatId": "x", "messages": [{"role": "user", "content": 42}]},
     "messages[0].content must be a string, a list of parts or null"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chatId is required"),
    ({"chatId": "x", "messages": [{"role": "user", "content": "hi"}],
      "sampling": {"temperature": -1}}, "sampling.temperature must be a number from 0 to 5"),
])
def test_malformed_params_get_invalid_params(server: RawServer, params: dict[str, Any],
                                             message: str) -> None:
    reply = server.response(server.request(CHAT, params))
    assert reply["error"] == {"code": -32602, "message": f"invalid params for {CHAT}: {message}"}
    assert "result" in ask(server, "ok", [{"role": "user", "content": "hi"}],
                           sampling={"maxTokens": 2})


def test_an_image_for_a_model_without_vision_is_refused(server: RawServer) -> None:
    reply = ask(server, "c6", [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": PNG_1X1}}]}])
    assert reply["error"] == {"code": -32803, "message": (
        "this model has no vision encoder: it cannot read images (remove the image, or use a "
        "vision model such as Pixtral)")}


def test_tools_for_a_tokenizer_without_function_calling_are_refused(
        make_checkpoint: CheckpointFactory) -> None:
    server = start(make_checkpoint("native", tokenizer="v1", seed=3, **MODEL_SHAPE))
    try:
        reply = server.response(server.request(CHAT, {
            "chatId": "v1", "tools": True, "clientTools": [
                {"name": "lookup", "description": "Look up a word",
                 "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}],
            "messages": [{"role": "user", "content": "hi"}]}), timeout=60)
        assert reply["error"] == {"code": -32803, "message": (
            "this model's tokenizer (v1) cannot encode tools: ask without tools (tools: false), "
            "or use a model with function calling (tokenizer v2 or newer)")}
    finally:
        server.close()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def screenshot(width: int, height: int, seed: int) -> bytes:
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_turn(*urls: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is on the screen?"},
                                         *({"type": "image_url", "image_url": {"url": u}}
                                           for u in urls)]}]


def test_a_pasted_screenshot_reaches_a_vision_model_and_its_cache(
        make_pixtral: CheckpointFactory) -> None:
    server = start(make_pixtral("native"), maxImageMiB=1)
    try:
        shot = data_uri(screenshot(64, 48, 0))
        first = ask(server, "img", image_turn(shot))["result"]
        assert first["usage"]["promptTokens"] > 20  # the image's tokens are in the prompt
        texts = "".join(d["text"] for d in deltas(server, "img"))
        assert texts == first["message"]["content"]
        # The same screenshot again: its keys and values come from the chat's cache.
        history = [first["userMessage"], *first["messages"],
                   {"role": "user", "content": "And now?"}]
        second = ask(server, "img", history)["result"]
        assert second["usage"]["reusedTokens"] >= first["usage"]["promptTokens"]
        # Another screenshot of the same size: same token ids, other pixels: not reused.
        other = ask(server, "img2", image_turn(data_uri(screenshot(64, 48, 1))))["result"]
        assert other["usage"]["reusedTokens"] == 0
    finally:
        server.close()


@pytest.mark.parametrize("url, message", [
    (lambda: data_uri(png_claiming(10, 10).ljust(3 * 2**19, b"\0")),  # 1.5 MiB
     "image refused: the image is about 1.5 MiB, over the limit of 1.0 MiB"),
    (lambda: data_uri(png_claiming(100_000, 100_000)),
     "image refused: the image is 100000x100000 pixels (10,000,000,000 pixels), over the limit "
     "of 16,777,216 pixels"),
    (lambda: "https://example.com/shot.png",
     "image refused: only data: URIs are accepted for images (no URL is fetched)"),
    (lambda: "data:image/png;base64,AAAA",
     "image refused: not an image in a known format (it starts with b'\\x00\\x00\\x00'); use "
     "PNG, JPEG, WEBP or GIF"),
])
def test_bad_images_are_refused_and_the_server_goes_on(
        make_pixtral: CheckpointFactory, url: Any, message: str) -> None:
    server = start(make_pixtral("native"), maxImageMiB=1)
    try:
        reply = ask(server, "bad", image_turn(url()))
        assert reply["error"]["code"] == -32803
        assert reply["error"]["message"].startswith(message), reply["error"]["message"]
        assert "result" in ask(server, "fine", [{"role": "user", "content": "hi"}],
                               sampling={"maxTokens": 2})
    finally:
        server.close()


def test_nine_images_in_one_message_are_too_many(make_pixtral: CheckpointFactory) -> None:
    server = start(make_pixtral("native"))
    try:
        shot = data_uri(screenshot(16, 16, 0))
        reply = ask(server, "many", image_turn(*[shot] * 9))
        assert reply["error"] == {"code": -32803, "message": (
            "image refused: message 1 has 9 images; at most 8 per message")}
    finally:
        server.close()
