"""The HTTP/SSE layer against a misbehaving server (faulty_server.py, a subprocess on 127.0.0.1):
every fault is one clear one-line `RemoteError` within its time budget, memory stays bounded,
cancelling closes the connection, retries happen only when asked, the key never leaks."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lsp_server.backends.http import (
    Limits,
    RemoteClient,
    RemoteError,
    Superseded,
    parse_retry_after,
)

from .conftest import FaultyServer

KEY_ENV = "TRAMONTANE_TEST_REMOTE_KEY"
KEY = "sk-test-5eCr3t-do-not-leak-0123456789"
FAST = Limits(connect_timeout=2.0, chunk_timeout=0.5, deadline=10.0)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(autouse=True)
def no_key_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test of this module: no log line of any logger (httpx, httpcore, ours, at DEBUG)
    contains the key."""
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        assert KEY not in record.getMessage(), record.getMessage()


def client(server: FaultyServer, limits: Limits = FAST, **options: Any) -> RemoteClient:
    return RemoteClient(server.url, api_key_env=KEY_ENV, limits=limits, **options)


def unique(path: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}id={uuid.uuid4().hex[:8]}"


async def collect(remote: RemoteClient, path: str, **options: Any) -> list[dict[str, Any]]:
    async with remote.stream(path, {"prompt": [1, 2, 3], "stream": True}, **options) as events:
        return [event async for event in events]


async def fails(remote: RemoteClient, path: str, **options: Any) -> tuple[RemoteError, float]:
    start = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        await collect(remote, path, **options)
    error = caught.value
    text = str(error)
    assert "\n" not in text and KEY not in text and KEY not in repr(error)
    return error, time.monotonic() - start


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(c["text"] for e in events for c in e["choices"])


@pytest.mark.asyncio
async def test_a_valid_stream_gives_each_event_and_sends_the_key(faulty: FaultyServer) -> None:
    remote = client(faulty)
    target = unique("/ok")
    events = await collect(remote, target)
    await remote.aclose()
    assert text_of(events) == "def add(a, b)"
    assert [e["choices"][0]["finish_reason"] for e in events[:4]] == [None, None, None, "stop"]
    assert events[4] == {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                                  "total_tokens": 8}}
    [request] = faulty.requests_to(target)
    assert request["authorization"] == f"Bearer {KEY}"
    assert request["body"] == '{"prompt":[1,2,3],"stream":true}'


@pytest.mark.parametrize(("path", "message", "status"), [
    ("/status/500", "HTTP 500 Internal Server Error: something went wrong (500)", 500),
    ("/status/401", f"HTTP 401 Unauthorized; check the API key in ${KEY_ENV}: something went "
     "wrong (401)", 401),
    ("/status/404", "HTTP 404 Not Found for /status/404; check backend.url and backend.model: "
     "something went wrong (404)", 404),
    ("/status/429?retry_after=7", "HTTP 429 Too Many Requests; rate limited, retry after 7 s: "
     "something went wrong (429)", 429),
    ("/html", "expected an event stream, got text/html (is backend.url the API's /v1?)", None),
    ("/gzip", "the stream is compressed (gzip); this client reads identity-encoded streams "
     "only", None),
    ("/broken-sse", "malformed event (Unterminated string starting at: line 1 column 23 (char "
     "22)): {\"choices\": [{\"text\": \"de", None),
    ("/not-object", "malformed event (not a JSON object): [1, 2]", None),
    ("/no-done", "the stream ended before [DONE]", None),
])
@pytest.mark.asyncio
async def test_http_errors_and_bad_streams_are_one_clear_error(
        faulty: FaultyServer, path: str, message: str, status: int | None) -> None:
    remote = client(faulty)
    error, elapsed = await fails(remote, path)
    assert str(error) == f"{faulty.url.removeprefix('http://')}: {message}"
    assert error.status == status
    assert elapsed < 5
    # The client keeps serving after the error.
    assert text_of(await collect(remote, "/ok")) == "def add(a, b)"
    await remote.aclose()


@pytest.mark.asyncio
async def test_429_carries_retry_after_in_seconds(faulty: FaultyServer) -> None:
    remote = client(faulty)
    error, _ = await fails(remote, "/status/429?retry_after=7")
    assert error.retry_after == 7.0
    error, _ = await fails(remote, "/status/503?retry_after=2")
    assert (error.status, error.retry_after) == (503, 2.0)
    await remote.aclose()


@pytest.mark.parametrize(("path", "limits", "message", "least"), [
    ("/stall-headers", FAST, "no response within 0.5 s", 0.5),
    ("/stall-mid", FAST, "the stream stalled (no data for 0.5 s)", 0.5),
    ("/endless", Limits(chunk_timeout=0.5, deadline=1.5), "no complete answer within the 1.5 s "
     "deadline", 1.5),
    ("/keepalive", Limits(chunk_timeout=0.5, deadline=1.5), "no complete answer within the "
     "1.5 s deadline", 1.5),
])
@pytest.mark.asyncio
async def test_stalls_and_endless_streams_end_within_their_budget(
        faulty: FaultyServer, path: str, limits: Limits, message: str, least: float) -> None:
    remote = client(faulty, limits)
    target = unique(path)
    error, elapsed = await fails(remote, target)
    await remote.aclose()
    assert str(error).endswith(message)
    assert least <= elapsed < least + 3
    await asyncio.sleep(0.2)
    assert target in faulty.log()["disconnects"]  # the connection was closed, not left open


@pytest.mark.asyncio
async def test_a_100_mb_line_is_refused_with_bounded_memory(faulty: FaultyServer) -> None:
    remote = client(faulty, Limits(chunk_timeout=5, deadline=20))
    tracemalloc.start()
    try:
        error, elapsed = await fails(remote, unique("/huge-line"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await remote.aclose()
    assert str(error).endswith("a stream line over 1024 KiB; stream abandoned")
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 10


@pytest.mark.asyncio
async def test_endless_garbage_stops_at_the_stream_cap_with_bounded_memory(
        faulty: FaultyServer) -> None:
    remote = client(faulty, Limits(chunk_timeout=5, deadline=60, max_stream_bytes=4 * 2**20))
    tracemalloc.start()
    try:
        error, _ = await fails(remote, unique("/garbage"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await remote.aclose()
    assert str(error).endswith("the stream exceeded 4 MiB; stream abandoned")
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("path", ["/endless", "/endless?interval=0", "/stall-mid",
                                  "/stall-headers"])
@pytest.mark.asyncio
async def test_cancelling_the_reader_closes_the_connection_at_once(
        faulty: FaultyServer, path: str) -> None:
    """`interval=0` floods the reader, and the loop is held up before the cancel: the read it
    waits on has completed when the cancel arrives, which `asyncio.wait_for` (3.10, 3.11)
    would answer by dropping the cancellation and reading on."""
    remote = client(faulty, Limits(chunk_timeout=60, deadline=120))
    target = unique(path)
    first = asyncio.Event()

    async def read() -> None:
        async with remote.stream(target, {}) as events:
            async for _ in events:
                first.set()

    task = asyncio.ensure_future(read())
    if path == "/stall-headers":
        while not faulty.requests_to(target):
            await asyncio.sleep(0.02)
    else:
        await asyncio.wait_for(first.wait(), 10)
    time.sleep(0.2)  # blocks the loop: data piles up in the socket
    cancelled_at = faulty.log()["now"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        disconnects = faulty.log()["disconnects"]
        if target in disconnects:
            break
        await asyncio.sleep(0.02)
    await remote.aclose()
    assert disconnects[target] - cancelled_at < 1.0


@pytest.mark.asyncio
async def test_retries_only_when_asked(faulty: FaultyServer) -> None:
    remote = client(faulty)
    target = unique("/flaky?fails=2&code=503")
    error, _ = await fails(remote, target)  # chat: no retries
    assert error.status == 503
    assert len(faulty.requests_to(target)) == 1

    target = unique("/flaky?fails=2&code=503")
    assert text_of(await collect(remote, target, retries=2)) == "def add(a, b)"
    assert len(faulty.requests_to(target)) == 3

    target = unique("/flaky?fails=1&code=429&retry_after=0.3")
    start = time.monotonic()
    assert text_of(await collect(remote, target, retries=1)) == "def add(a, b)"
    assert time.monotonic() - start >= 0.3
    await remote.aclose()


@pytest.mark.asyncio
async def test_no_retry_for_errors_that_would_repeat_or_past_the_deadline(
        faulty: FaultyServer) -> None:
    remote = client(faulty)
    target = unique("/status/401")
    await fails(remote, target, retries=3)
    assert len(faulty.requests_to(target)) == 1
    # Retry-After beyond the deadline: give up at once with the server's answer.
    target = unique("/flaky?fails=1&code=429&retry_after=30")
    error, elapsed = await fails(remote, target, retries=3, deadline=2)
    assert (error.status, error.retry_after, len(faulty.requests_to(target))) == (429, 30, 1)
    assert elapsed < 1.5
    await remote.aclose()


@pytest.mark.asyncio
async def test_connection_refused_is_retried_only_when_asked() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    remote = RemoteClient(f"http://127.0.0.1:{port}/v1", limits=FAST)
    with pytest.raises(RemoteError) as caught:
        await collect(remote, "/completions")
    assert str(caught.value) == f"127.0.0.1:{port}: cannot connect (All connection attempts " \
        "failed)"
    start = time.monotonic()
    with pytest.raises(RemoteError):
        await collect(remote, "/completions", retries=2)
    assert time.monotonic() - start >= 0.25 + 0.5  # two back-offs: 0.25 s, 0.5 s
    await remote.aclose()


@pytest.mark.asyncio
async def test_the_key_is_redacted_when_the_server_echoes_it(faulty: FaultyServer) -> None:
    remote = client(faulty)
    error, _ = await fails(remote, unique("/echo-key"))
    assert str(error).endswith("Invalid authorization header: Bearer ***")
    assert KEY not in repr(remote)
    # Inside a stream too: no event handed to the wire layer carries the key.
    assert await collect(remote, unique("/echo-key-stream")) == [
        {"error": {"message": "bad header Bearer ***"}}]
    await remote.aclose()


def test_a_missing_key_variable_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RemoteError) as caught:
        RemoteClient("http://127.0.0.1:1/v1", api_key_env=KEY_ENV)
    assert str(caught.value) == f"the API key's environment variable ${KEY_ENV} is not set or " \
        "empty (backend.apiKeyEnv)"


@pytest.mark.parametrize(("url", "message"), [
    ("127.0.0.1:8000/v1", "backend.url must be an http:// or https:// URL, got "
     "'127.0.0.1:8000/v1'"),
    ("ftp://example.org/v1", "backend.url must be an http:// or https:// URL, got "
     "'ftp://example.org/v1'"),
])
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(RemoteError) as caught:
        RemoteClient(url)
    assert str(caught.value) == message


@pytest.mark.asyncio
async def test_rate_limit_spaces_requests(faulty: FaultyServer) -> None:
    remote = client(faulty, max_requests_per_second=2)
    targets = [unique("/ok") for _ in range(5)]
    await asyncio.gather(*(collect(remote, t) for t in targets))
    await remote.aclose()
    times = sorted(faulty.requests_to(t)[0]["time"] for t in targets)
    # At most two requests in any one-second window.
    assert all(b - a >= 0.95 for a, b in zip(times[:-2], times[2:], strict=True))


@pytest.mark.asyncio
async def test_a_superseded_request_is_dropped_before_it_is_sent(faulty: FaultyServer) -> None:
    remote = client(faulty, max_requests_per_second=1)
    first, second = unique("/ok"), unique("/ok")
    await collect(remote, first)
    newer = asyncio.Event()  # set by a newer keystroke while `second` waits for its turn
    waiting = asyncio.ensure_future(collect(remote, second, superseded=newer.is_set))
    await asyncio.sleep(0.2)
    newer.set()
    with pytest.raises(Superseded):
        await waiting
    await remote.aclose()
    assert faulty.requests_to(second) == []


@pytest.mark.asyncio
async def test_tls_is_verified_and_ca_bundle_trusts_a_private_ca(
        faulty_tls: FaultyServer, certificate: tuple[Path, Path]) -> None:
    remote = client(faulty_tls)
    error, _ = await fails(remote, "/ok")
    assert str(error) == f"{faulty_tls.url.removeprefix('https://')}: TLS certificate not " \
        "trusted (self-signed certificate); for a private CA set backend.caBundle"
    await remote.aclose()
    remote = client(faulty_tls, ca_bundle=str(certificate[0]))
    assert text_of(await collect(remote, "/ok")) == "def add(a, b)"
    await remote.aclose()


def test_an_unreadable_ca_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as caught:
        RemoteClient("https://127.0.0.1:1/v1", ca_bundle=str(tmp_path / "none.pem"))
    assert str(caught.value) == f"backend.caBundle '{tmp_path / 'none.pem'}' cannot be used: " \
        "No such file or directory"


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


SSE = (b": comment\r\n"
       b"data: {\"a\": 1}\r\n\r\n"
       b"event: message\nid: 7\ndata: {\"b\":\ndata: 2}\n\n"
       b"data:{\"c\": \"\xc3\xa9\"}\r\r"
       b"data: [DONE]\n\n"
       b"data: {\"after\": \"done\"}\n\n")


@pytest.mark.parametrize("size", [len(SSE), 1, 2, 3, 7])
@pytest.mark.asyncio
async def test_sse_framing_whatever_the_chunking(size: int) -> None:
    """CRLF, CR and LF line ends (split across chunks too), comments, other fields, multi-line
    data, no space after the colon; nothing after [DONE]."""
    pieces = [SSE[i:i + size] for i in range(0, len(SSE), size)]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              stream=Chunks(pieces))

    remote = RemoteClient("http://127.0.0.1:9/v1", transport=httpx.MockTransport(handler))
    assert await collect(remote, "/completions") == [{"a": 1}, {"b": 2}, {"c": "é"}]
    await remote.aclose()


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
