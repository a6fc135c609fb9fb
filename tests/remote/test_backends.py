"""The remote backends in this process (lsp_server/backends/openai.py, mistral.py, remote.py)
against the misbehaving server: the `backend` settings, which tokenizer builds the prompts, the
requests they send, the events and counters they give back, closing the stream on stop and
cancel, supersession before sending, retries for completions only, a 429's wait, and tool
calls from a recorded vLLM stream."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lsp_server.backends import tokenizers
from lsp_server.backends.base import (
    BackendError,
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    End,
    Event,
    Sampling,
    TextDelta,
    ToolCall,
    ToolCalls,
    ToolSpec,
)
from lsp_server.backends.mistral import MistralBackend
from lsp_server.backends.openai import OpenAIBackend, repair_arguments
from lsp_server.backends.remote import RemoteBackend, wire_messages
from lsp_server.backends.wire import Image, Message
from lsp_server.backends.wire import ToolCall as WireToolCall
from lsp_server.settings import (
    BackendSettings,
    CompletionSettings,
    Settings,
    merge_settings,
)
from tests.conftest import CheckpointFactory

from .conftest import FaultyServer

V3 = str(tokenizers.data_folder() / tokenizers.V3)
KEY_ENV = "TRAMONTANE_TEST_BACKEND_KEY"
KEY = "sk-backend-test-0123456789abcdef"
READ_FILE = ToolSpec("read_file", "Read a file of the workspace", {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})


def unique() -> str:
    return f"id={uuid.uuid4().hex[:8]}"


def settings(url: str, budget_ms: int = 3000, **backend: Any) -> Settings:
    options = {"model": "tiny", "tokenizer": V3, **backend}
    return Settings(backend=BackendSettings(url=url, **options),
                    completion=CompletionSettings(time_budget_ms=budget_ms))


async def configured(kind: type[RemoteBackend], url: str, **options: Any
                     ) -> tuple[RemoteBackend, list[BackendStatus]]:
    statuses: list[BackendStatus] = []
    backend = kind(statuses.append)
    await backend.configure(settings(url, **options))
    return backend, statuses


def fim(key: str = "file:///w/a.py", max_tokens: int = 16, stop: Any = None,
        ends: list[End] | None = None) -> CompletionRequest:
    return CompletionRequest(key, "def add(", "\n", (1, 13, 781, 11, 1569),
                             Sampling(max_tokens), stop=stop,
                             on_end=ends.append if ends is not None else None)


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


# --- settings -----------------------------------------------------------------------------------

def test_backend_settings_defaults_and_a_full_section() -> None:
    assert Settings().backend == BackendSettings("local", "http://127.0.0.1:8000/v1", None, None,
                                                 None, None, None)
    new, warnings = merge_settings(Settings(), {"backend": {
        "kind": "openai", "url": "https://gpu.example:8443/v1", "model": "codestral",
        "tokenizer": "~/models/codestral", "apiKeyEnv": "TEAM_KEY",
        "maxRequestsPerSecond": 2.5, "caBundle": "/etc/ca.pem"}})
    assert warnings == []
    assert new.backend == BackendSettings("openai", "https://gpu.example:8443/v1", "codestral",
                                          "~/models/codestral", "TEAM_KEY", 2.5, "/etc/ca.pem")


@pytest.mark.parametrize(("raw", "warning"), [
    ({"kind": "vllm"}, "setting backend.kind = 'vllm' is invalid (expected \"local\" or "
     "\"openai\" or \"mistral\"); keeping 'local'"),
    ({"url": "127.0.0.1:8000/v1"}, "setting backend.url = '127.0.0.1:8000/v1' is invalid "
     "(expected an http:// or https:// URL of the API's base, e.g. "
     "\"http://127.0.0.1:8000/v1\"); keeping 'http://127.0.0.1:8000/v1'"),
    ({"url": "http://host:99999/v1"}, "setting backend.url = 'http://host:99999/v1' is invalid "
     "(expected an http:// or https:// URL of the API's base, e.g. "
     "\"http://127.0.0.1:8000/v1\"); keeping 'http://127.0.0.1:8000/v1'"),
    ({"maxRequestsPerSecond": 0}, "setting backend.maxRequestsPerSecond = 0 is invalid "
     "(expected a number of requests per second from 0.1 to 1000, or null for no limit); "
     "keeping None"),
    ({"model": ""}, "setting backend.model = '' is invalid (expected a non-empty string or "
     "null); keeping None"),
])
def test_invalid_backend_settings_warn_and_keep_the_previous_value(
        raw: dict[str, Any], warning: str) -> None:
    new, warnings = merge_settings(Settings(), {"backend": raw})
    assert warnings == [warning]
    assert new.backend == BackendSettings()


def test_a_key_pasted_into_api_key_env_is_refused_and_not_repeated() -> None:
    _, warnings = merge_settings(Settings(), {"backend": {"apiKeyEnv": KEY}})
    assert warnings == ["setting backend.apiKeyEnv = (the value is not repeated here) is "
                        "invalid (expected the name of an environment variable holding the "
                        "key, e.g. \"MISTRAL_API_KEY\", or null; never the key itself); "
                        "keeping None"]


# --- tokenizers ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "text_fim", "file"), [
    ("codestral", False, tokenizers.V3),
    ("mistralai/Codestral-22B-v0.1", False, tokenizers.V3),
    ("codestral-2405", False, tokenizers.V3),
    ("Mistral-Nemo-Instruct-2407", False, tokenizers.TEKKEN_NEMO),
    ("pixtral-12b-2409", False, tokenizers.TEKKEN_PIXTRAL),
    ("codestral-latest", False, None),  # vLLM: ids must be the model's own; not published
    ("codestral-latest", True, tokenizers.V3),  # Mistral's API: counts only
    ("codestral-2501", True, tokenizers.V3),
    ("gpt-4o", True, None),
])
def test_shipped_tokenizers_for_known_models(model: str, text_fim: bool,
                                             file: str | None) -> None:
    found = tokenizers.shipped_tokenizer(model, text_fim=text_fim)
    assert found == (tokenizers.data_folder() / file if file else None)
    assert found is None or found.is_file()


def test_tokenizer_from_a_model_folder_a_file_or_an_error(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = make_checkpoint("native", tokenizer="tekken")
    tokenizer, source = tokenizers.load(str(folder), "anything", text_fim=False)
    assert source == folder / "tekken.json"
    assert tokenizer.version == "v3"  # tekken_240911 is Tekken v3
    tokenizer, source = tokenizers.load(V3, "anything", text_fim=False)
    assert (source.name, tokenizer.version) == (tokenizers.V3, "v3")
    with pytest.raises(BackendError) as caught:
        tokenizers.load(None, "my-finetune", text_fim=False)
    assert str(caught.value) == (
        "no tokenizer known for the served model 'my-finetune': set backend.tokenizer to its "
        "tokenizer file (tekken.json or tokenizer.model.v3) or its model folder")
    with pytest.raises(BackendError) as caught:
        tokenizers.load(str(tmp_path), "codestral", text_fim=False)
    assert str(caught.value) == (
        f"backend.tokenizer {str(tmp_path)!r}: no Mistral tokenizer file (tekken.json or "
        "tokenizer.model.v1/v2/v3/v7); copy the one published with the model into this folder")
    with pytest.raises(BackendError) as caught:
        tokenizers.load(str(tmp_path / "none.model"), "codestral", text_fim=False)
    assert str(caught.value) == (f"backend.tokenizer {str(tmp_path / 'none.model')!r} is not a "
                                 "tokenizer file or a folder holding one")


# --- conversions --------------------------------------------------------------------------------

def test_vllm_stray_colon_is_dropped_only_before_a_json_object() -> None:
    assert repair_arguments(':{"path":"main.py"}') == '{"path":"main.py"}'
    assert repair_arguments('{"path":"main.py"}') == '{"path":"main.py"}'
    assert repair_arguments(":[1, 2]") == ":[1, 2]"
    assert repair_arguments(':{"path":') == ':{"path":'
    assert repair_arguments(":") == ":"


PNG = b"\x89PNG\r\n\x1a\n"


def test_chat_messages_become_wire_messages() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a.py:\n```\nx\n```\n\n"},
                                     {"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": uri}}]},
        {"role": "assistant", "content": ""},  # the model stopped at once: says nothing
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "name": "read_file", "content": "x = 1"},
    ]
    assert wire_messages(messages) == [
        Message("system", "Be brief."),
        Message("user", "a.py:\n```\nx\n```\n\nWhat is this?", (Image(PNG, "image/png"),)),
        Message("assistant", tool_calls=(WireToolCall("abcDEF123", "read_file",
                                                      '{"path": "a.py"}'),)),
        Message("tool", "x = 1", tool_call_id="abcDEF123", name="read_file"),
    ]


@pytest.mark.parametrize(("url", "message"), [
    ("https://example.org/cat.png", "only data: URIs are accepted for images (no URL is "
     "fetched)"),
    ("data:text/plain;base64,aGk=", "an image must be a base64 data: URI of an image type "
     "(data:image/png;base64,...)"),
    ("data:image/png;base64,%%%", "an image's data: URI is not valid base64"),
])
def test_images_must_be_data_uris(url: str, message: str) -> None:
    with pytest.raises(BackendError) as caught:
        wire_messages([{"role": "user", "content": [{"type": "image_url",
                                                      "image_url": {"url": url}}]}])
    assert str(caught.value) == message


# --- configuration and status -------------------------------------------------------------------

@pytest.mark.asyncio
async def test_ready_status_names_the_model_the_server_and_the_tokenizer(
        faulty: FaultyServer) -> None:
    backend, statuses = await configured(OpenAIBackend, faulty.url + "/ok")
    label = faulty.url.removeprefix("http://")
    assert statuses == [BackendStatus("ready", f"tiny at {label} (openai backend, tokenizer "
                                      f"{tokenizers.V3} v3)", {"fastDecode": False})]
    assert backend.tokenizer is not None and backend.name == f"tiny at {label}"
    # Settings of another section: nothing is redone.
    await backend.configure(Settings(backend=backend._settings or BackendSettings()))
    assert len(statuses) == 1
    await backend.close()


@pytest.mark.asyncio
async def test_misconfigurations_are_an_error_status(faulty: FaultyServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    label = faulty.url.removeprefix("http://")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": None}, "backend.model is not set: name the model the openai server serves "
         "(vLLM's --served-model-name, or e.g. codestral-latest on Mistral's API)"),
        ({"tokenizer": None, "model": "my-model"}, "no tokenizer known for the served model "
         "'my-model': set backend.tokenizer to its tokenizer file (tekken.json or "
         "tokenizer.model.v3) or its model folder"),
        ({"api_key_env": KEY_ENV}, f"the API key's environment variable ${KEY_ENV} is not set "
         "or empty (backend.apiKeyEnv)"),
        ({"model": "codestral"}, f"backend.model 'codestral' is not served at {label} (it "
         "serves: tiny)"),
    ]
    for options, message in cases:
        backend, statuses = await configured(OpenAIBackend, faulty.url + "/ok", **options)
        assert statuses == [BackendStatus("error", message, {"fastDecode": False})]
        await backend.close()


@pytest.mark.asyncio
async def test_an_unreachable_server_is_ready_with_a_note() -> None:
    """It may be starting (vLLM takes minutes): requests will say what is wrong."""
    backend, statuses = await configured(OpenAIBackend, "http://127.0.0.1:9/v1")
    [status] = statuses
    assert status.state == "ready"
    assert status.message.endswith("; could not list its models (127.0.0.1:9: cannot connect "
                                   "(All connection attempts failed))")
    await backend.close()


# --- completions --------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_openai_completion_sends_token_ids_and_reports_usage(faulty: FaultyServer) -> None:
    path = f"/ok/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path)
    ends: list[End] = []
    pieces: list[str] = []

    def stop(text: str) -> bool:
        pieces.append(text)
        return False

    events = await collect(backend.complete(fim(stop=stop, ends=ends)))
    assert events[:3] == [TextDelta("def"), TextDelta(" add"), TextDelta("(a, b)")]
    assert pieces == ["def", " add", "(a, b)"]  # the stop rule sees each piece as it comes
    end = events[3]
    assert isinstance(end, End) and ends == [end]
    assert (end.reason, end.prompt_tokens, end.generated_tokens, end.computed_tokens) == \
        ("stop", 5, 3, 8)
    [request] = faulty.requests_to(f"{path}/completions")
    assert json.loads(request["body"]) == {
        "model": "tiny", "prompt": [1, 13, 781, 11, 1569], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 16, "temperature": 0.0,
        "top_p": 1.0}
    await backend.close()


@pytest.mark.asyncio
async def test_mistral_completion_sends_the_windows_text(faulty: FaultyServer) -> None:
    path = f"/ok/{unique()}"
    backend, _ = await configured(MistralBackend, faulty.url + path, api_key_env=KEY_ENV)
    events = await collect(backend.complete(fim()))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["def", " add", "(a, b)"]
    [request] = faulty.requests_to(f"{path}/fim/completions")
    assert json.loads(request["body"]) == {
        "model": "tiny", "prompt": "def add(", "suffix": "\n", "stream": True,
        "max_tokens": 16, "temperature": 0.0, "top_p": 1.0}
    assert request["authorization"] == f"Bearer {KEY}"
    await backend.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


async def disconnected(faulty: FaultyServer, target: str, timeout: float = 5.0) -> float:
    """The server's time of the client's disconnect from `target`."""
    for _ in range(int(timeout / 0.02)):
        found = faulty.log()["disconnects"].get(target)
        if found is not None:
            return float(found)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{target}: the client never disconnected")


@pytest.mark.asyncio
async def test_the_stop_rule_closes_the_stream_at_once(faulty: FaultyServer) -> None:
    """An endless stream: post-processing says the completion is done after 3 pieces, the
    backend ends with "stop" and the connection is closed right then."""
    path = f"/endless/interval=0.02/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path)
    seen: list[str] = []
    ends: list[End] = []

    def stop(text: str) -> bool:
        seen.append(text)
        return len(seen) == 3

    events = await collect(backend.complete(fim(stop=stop, ends=ends)))
    stopped_at = faulty.log()["now"]
    assert events[:3] == [TextDelta("x")] * 3
    assert ends == [events[3]] and ends[0].reason == "stop" and ends[0].generated_tokens == 3
    assert await disconnected(faulty, f"{path}/completions") - stopped_at < 1.0
    await backend.close()


@pytest.mark.asyncio
async def test_a_server_ignoring_max_tokens_is_cut_there(faulty: FaultyServer) -> None:
    backend, _ = await configured(OpenAIBackend, faulty.url + f"/endless/interval=0/{unique()}")
    events = await collect(backend.complete(fim(max_tokens=8)))
    assert len(events) == 10 and events[-1] == End(
        "length", 5, 0, 14, 9, events[-1].seconds)  # type: ignore[union-attr]
    await backend.close()


@pytest.mark.asyncio
async def test_closing_the_iterator_closes_the_connection_and_reports_a_cancel(
        faulty: FaultyServer) -> None:
    path = f"/stall-mid/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path, budget_ms=60_000)
    ends: list[End] = []
    events = backend.complete(fim(ends=ends))
    assert await anext(events) == TextDelta("def")

    async def wait() -> None:
        await anext(events)

    reading = asyncio.ensure_future(wait())
    await asyncio.sleep(0.2)
    cancelled_at = faulty.log()["now"]
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await events.aclose()  # type: ignore[attr-defined]
    assert await disconnected(faulty, f"{path}/completions") - cancelled_at < 1.0
    [end] = ends
    assert end.reason == "cancelled" and end.stopped_ms is not None and end.stopped_ms < 500
    assert end.generated_tokens == 1
    await backend.close()


@pytest.mark.asyncio
async def test_a_superseded_completion_is_dropped_before_it_is_sent(faulty: FaultyServer) -> None:
    """One request per second: the second keystroke's request waits for the rate limiter; a
    third keystroke on the same document supersedes it before its turn comes."""
    path = f"/ok/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path, max_requests_per_second=1)
    await collect(backend.complete(fim()))
    ends: list[End] = []
    second = asyncio.ensure_future(collect(backend.complete(fim(ends=ends))))
    await asyncio.sleep(0.2)
    third = backend.complete(fim())  # the newer request for the same document
    assert await second == [End("cancelled", 5, 0, 5, 0, ends[0].seconds, 0.0)]
    assert len(faulty.requests_to(f"{path}/completions")) == 1
    assert len(await collect(third)) == 4
    assert len(faulty.requests_to(f"{path}/completions")) == 2
    # Another document is not superseded by it.
    other = asyncio.ensure_future(collect(backend.complete(fim(key="file:///w/b.py"))))
    await collect(backend.complete(fim()))
    assert len(await other) == 4
    await backend.close()


@pytest.mark.asyncio
async def test_completions_are_retried_once_chats_never(faulty: FaultyServer) -> None:
    path = f"/flaky/fails=1/code=503/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path)
    events = await collect(backend.complete(fim()))
    assert isinstance(events[-1], End) and events[-1].reason == "stop"
    assert len(faulty.requests_to(f"{path}/completions")) == 2
    with pytest.raises(BackendError) as caught:
        await collect(backend.chat(ChatRequest("c", [{"role": "user", "content": "hi"}], (),
                                               Sampling(16))))
    assert str(caught.value).endswith("HTTP 503 Service Unavailable: overloaded")
    assert len(faulty.requests_to(f"{path}/chat/completions")) == 1
    await backend.close()


@pytest.mark.asyncio
async def test_after_a_429_completions_wait_for_retry_after_without_sending(
        faulty: FaultyServer) -> None:
    path = f"/status/429/retry_after=30/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path)
    label = faulty.url.removeprefix("http://")
    first = f"{label}: HTTP 429 Too Many Requests; rate limited, retry after 30 s: something " \
        "went wrong (429)"
    with pytest.raises(BackendError) as caught:
        await collect(backend.complete(fim()))
    assert str(caught.value) == first
    with pytest.raises(BackendError) as caught:
        await collect(backend.complete(fim()))
    assert str(caught.value) in (f"{first}; not sending until then (30 s left)",
                                 f"{first}; not sending until then (29 s left)")
    assert len(faulty.requests_to(f"{path}/completions")) == 1
    await backend.close()


# --- chat ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_recorded_vllm_tool_call_becomes_one_repaired_call(faulty: FaultyServer) -> None:
    path = f"/tool-call/{unique()}"
    backend, _ = await configured(OpenAIBackend, faulty.url + path)
    ends: list[End] = []
    request = ChatRequest("c", [{"role": "user", "content": "Show me main.py"}], (READ_FILE,),
                          Sampling(80), on_end=ends.append)
    events = await collect(backend.chat(request))
    calls, end = events
    assert isinstance(calls, ToolCalls) and isinstance(end, End)
    [call] = calls.calls
    assert call == ToolCall(call.id, "read_file", '{"path":"main.py"}')
    assert len(call.id) == 9 and call.id.isalnum()
    assert ends == [end] and end.reason == "stop" and end.prompt_tokens > 0
    [sent] = faulty.requests_to(f"{path}/chat/completions")
    body = json.loads(sent["body"])
    assert body["tools"] == [{"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the workspace",
        "parameters": READ_FILE.parameters}}]
    assert body["messages"] == [{"role": "user", "content": "Show me main.py"}]
    await backend.close()


def test_vllms_prompt_cache_counts_become_reused_tokens() -> None:
    """vLLM with --enable-prompt-tokens-details (deploy/compose.yaml) says how much of the
    prompt came from its prefix cache; the status shows it as reusedTokens."""
    from lsp_server.backends.remote import _Run
    from lsp_server.backends.wire import Usage, usage_of

    usage = usage_of({"usage": {"prompt_tokens": 2071, "completion_tokens": 12,
                                "prompt_tokens_details": {"cached_tokens": 2048}}}, "vllm")
    assert usage == Usage(2071, 12, 2048)
    run = _Run(None, 2071)
    run.usage = usage
    end = run.end("stop")
    assert (end.prompt_tokens, end.reused_tokens, end.computed_tokens, end.generated_tokens) \
        == (2071, 2048, 35, 12)
    assert usage_of({"usage": {"prompt_tokens": 5, "completion_tokens": 3}}, "x") == Usage(5, 3)
