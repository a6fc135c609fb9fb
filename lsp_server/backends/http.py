"""Async HTTP with server-sent events for the remote backends (vLLM, Mistral's API).

One request is `async with client.stream(path, body) as events: async for data in events`,
where each `data` is the JSON object of one SSE event, up to `data: [DONE]`. Whatever goes
wrong, from a refused connection to a 100 MB line, surfaces as one `RemoteError` whose message
is one line fit for an editor's status bar, and never contains the API key.

Trade-offs, each deliberate:

- The reader is our own, over `Response.aiter_raw()`: httpx's `aiter_lines` has no bound on a
  line's length, and its decoders would inflate a compressed body without limit. We ask for
  `identity` encoding and refuse any other, and a line, an event or the whole stream over its
  limit ends the request. Cost: no compression (SSE deltas are small; the prompt goes up).
  Measured: a 100 MB line is refused after its first MiB with a 3 MiB peak of Python memory.
- Three clocks: `connect_timeout` (TCP and TLS), `chunk_timeout` (the longest silence between
  two reads, and before the status line), and `deadline` (the whole request, from the call:
  rate-limit wait and retries included). A server that trickles keep-alive comments beats the
  chunk timeout but not the deadline.
- Cancelling the task that reads (a newer keystroke, `$/cancelRequest`, the time budget, a
  stopped chat turn) closes the TCP connection at once, however many cancellations arrive, so
  vLLM aborts the generation: httpx never runs in the caller's task but in tasks of its own,
  stopped by anyio cancel scopes (exchange.py says why). The step timeouts run in the reading
  task (`asyncio.timeout`): `asyncio.wait_for` dropped a cancellation that raced a completed
  read, and the stream read on (tests show it).
- Retries only when the caller asks (completions: a keystroke's request is idempotent and
  cheap), never by default (chat: a turn must not run twice), and only before the first byte of
  the event stream: connection failures, 429 (after `Retry-After`, if the deadline allows) and
  502/503/504 (and 500) with a short exponential back-off.
- `trust_env=False`: no proxy or certificate settings are taken from the environment, so what
  the settings say is what happens; a private CA goes in `ca_bundle`, which then replaces the
  system's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from asyncio_throttle import Throttler

from .exchange import Exchange, next_chunk

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1 << 20
# Status codes worth another try (when the caller allows retries at all).
RETRYABLE = frozenset({429, 500, 502, 503, 504})
# How much of an error response's body is read to find its message.
ERROR_BODY_BYTES = 4096
# How long a closed request's httpx tasks are waited for (they go on if they take longer).
CLOSE_WAIT_S = 2.0


class RemoteError(Exception):
    """The one error of the remote layer. `str()` is a one-line message for the editor's status;
    `status` is the HTTP status when there was one, `retry_after` the seconds a 429 or 503 asked
    to wait."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Superseded(Exception):
    """The request was dropped before it was sent: the caller's `superseded()` said so."""


@dataclass(frozen=True)
class Limits:
    """Time (seconds) and size (bytes) bounds of one streamed request."""

    connect_timeout: float = 5.0
    chunk_timeout: float = 30.0
    deadline: float = 300.0
    max_line_bytes: int = MiB
    max_event_bytes: int = 4 * MiB
    max_stream_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "chunk_timeout", "deadline"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_line_bytes", "max_event_bytes", "max_stream_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")


def read_api_key(env_name: str | None) -> str | None:
    """The key from the environment variable named `env_name` (None: no key is sent)."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise RemoteError(f"the API key's environment variable ${env_name} is not set or empty "
                          "(backend.apiKeyEnv)")
    return key


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verification on; `ca_bundle` (a PEM file) replaces the system's certificate store."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as e:
        raise RemoteError(f"backend.caBundle {ca_bundle!r} cannot be used: "
                          f"{e.strerror or e}") from None


def throttler(max_requests_per_second: float | None) -> Throttler | None:
    """None: no limit. Below one per second, one request per 1/rate seconds."""
    rate = max_requests_per_second
    if rate is None:
        return None
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise RemoteError(f"backend.maxRequestsPerSecond must be a positive number or null, "
                          f"got {rate!r}")
    if rate >= 1 and float(rate).is_integer():
        return Throttler(rate_limit=int(rate), period=1.0)
    return Throttler(rate_limit=1, period=1.0 / rate)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header: a number of seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _Clock:
    """The request's deadline, and waits bounded by both it and a per-step timeout."""

    def __init__(self, deadline: float, label: str) -> None:
        self.budget = deadline
        self.label = label
        self.end = time.monotonic() + deadline

    def remaining(self) -> float:
        return self.end - time.monotonic()

    async def wait(self, step: Callable[[], Awaitable[T]], timeout: float, stalled: str) -> T:
        """Await `step()`, made only if the deadline has not passed. `stalled` is the message
        when the step timeout (not the deadline) fires."""
        remaining = self.remaining()
        if remaining <= 0:
            raise RemoteError(self.overrun())
        try:
            if sys.version_info >= (3, 11):
                # In the caller's task: a cancellation can never be lost.
                async with asyncio.timeout(min(timeout, remaining)):
                    return await step()
            # Python 3.10: wait_for loses a cancellation that races a result (bpo-42130);
            # the next read then sees it.
            return await asyncio.wait_for(step(), min(timeout, remaining))
        except asyncio.TimeoutError:
            raise RemoteError(self.overrun() if timeout >= remaining else stalled) from None

    def overrun(self) -> str:
        return f"{self.label}: no complete answer within the {self.budget:g} s deadline"


class RemoteClient:
    """One base URL, one API key, one rate limit; many concurrent streamed requests.

    `label` names the server in messages (default: host and port). Close with `aclose()`.
    `transport` is for tests.
    """

    def __init__(self, base_url: str, *, api_key_env: str | None = None,
                 ca_bundle: str | None = None, max_requests_per_second: float | None = None,
                 limits: Limits | None = None, label: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.limits = limits or Limits()
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL as e:
            raise RemoteError(f"backend.url {base_url!r} is not a URL: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise RemoteError(f"backend.url must be an http:// or https:// URL, got {base_url!r}")
        self.label = label or (f"{url.host}:{url.port}" if url.port else url.host)
        self.api_key_env = api_key_env
        self._key = read_api_key(api_key_env)
        self._background: set[asyncio.Future[Any]] = set()  # requests being closed
        self._throttler = throttler(max_requests_per_second)
        timeout = httpx.Timeout(self.limits.chunk_timeout, connect=self.limits.connect_timeout,
                                pool=self.limits.connect_timeout)
        self._client = httpx.AsyncClient(
            base_url=str(url).rstrip("/") + "/", timeout=timeout, verify=ssl_context(ca_bundle),
            trust_env=False, transport=transport, follow_redirects=False,
            headers={"Accept-Encoding": "identity", "User-Agent": "tramontane"})

    def __repr__(self) -> str:
        return f"RemoteClient({self.label!r}, api_key_env={self.api_key_env!r})"

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=CLOSE_WAIT_S)
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def _exchange(self) -> AsyncIterator[Exchange]:
        exchange = Exchange(self._background)
        try:
            yield exchange
        finally:
            closing = exchange.close()
            if closing:  # asyncio.wait never cancels them, even when we are cancelled
                await asyncio.wait(closing, timeout=CLOSE_WAIT_S)

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: Mapping[str, Any], *, retries: int = 0,
                     superseded: Callable[[], bool] | None = None,
                     deadline: float | None = None,
                     ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """POST `body` as JSON to `path` (relative to the base URL) and yield the events' JSON
        objects. `superseded()` is asked right before each send (after the rate limiter's wait):
        True drops the request with `Superseded`. `deadline` overrides `limits.deadline`."""
        clock = _Clock(self.limits.deadline if deadline is None else deadline, self.label)
        async with self._exchange() as exchange:
            response = await self._open(path.lstrip("/"), body, retries, superseded, clock,
                                        exchange)
            yield self._events(response, clock, exchange)

    async def _open(self, path: str, body: Mapping[str, Any], retries: int,
                    superseded: Callable[[], bool] | None, clock: _Clock,
                    exchange: Exchange) -> httpx.Response:
        headers = {"Accept": "text/event-stream"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        request = self._client.build_request("POST", path, json=body, headers=headers)
        for attempt in range(retries + 1):
            if self._throttler is not None:
                await clock.wait(self._throttler.acquire, clock.remaining(), "")
            if superseded is not None and superseded():
                raise Superseded()
            try:
                # httpx's own timeouts (connect, then read) fire first; this is the backstop.
                response = await clock.wait(
                    lambda: exchange.run(self._client.send(request, stream=True)),
                    self.limits.connect_timeout + self.limits.chunk_timeout + 1,
                    f"{self.label}: no response within {self.limits.chunk_timeout:g} s")
            except httpx.TransportError as e:
                error = self._transport_error(e)
                if attempt < retries and isinstance(e, (httpx.ConnectError,
                                                        httpx.ConnectTimeout)):
                    await self._back_off(error, attempt, clock)
                    continue
                raise error from None
            if response.status_code == 200:
                try:
                    self._check_stream(response)
                except RemoteError:
                    exchange.release(response)
                    raise
                return response
            error = await self._status_error(response, clock, exchange)
            if attempt < retries and response.status_code in RETRYABLE:
                await self._back_off(error, attempt, clock)
                continue
            raise error
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _back_off(self, error: RemoteError, attempt: int, clock: _Clock) -> None:
        wait = error.retry_after if error.retry_after is not None else 0.25 * 2 ** attempt
        if wait >= clock.remaining():
            raise error
        log.info("%s; retrying in %.2f s", error, wait)
        await asyncio.sleep(wait)

    async def get_json(self, path: str, *, deadline: float = 5.0,
                       max_bytes: int = MiB) -> Any:
        """GET `path` and decode its JSON body (read up to `max_bytes`): a cheap check such as
        `models`. Never retried; `RemoteError` for anything but a 200 with JSON."""
        clock = _Clock(deadline, self.label)
        headers = {"Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        request = self._client.build_request("GET", path.lstrip("/"), headers=headers)
        async with self._exchange() as exchange:
            try:
                response = await clock.wait(
                    lambda: exchange.run(self._client.send(request, stream=True)), deadline,
                    f"{self.label}: no response within {deadline:g} s")
            except httpx.TransportError as e:
                raise self._transport_error(e) from None
            if response.status_code != 200:
                raise await self._status_error(response, clock, exchange)
            try:
                body = await self._read_some(response, clock, max_bytes + 1, exchange)
            except httpx.TransportError as e:
                raise self._transport_error(e) from None
        if len(body) > max_bytes:
            raise RemoteError(f"{self.label}: the answer to GET {path} is over "
                              f"{max_bytes // 1024} KiB")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RemoteError(self._redact(f"{self.label}: GET {path} did not answer JSON: "
                                           f"{_excerpt(body)}")) from None

    def _transport_error(self, e: httpx.TransportError) -> RemoteError:
        cause: BaseException | None = e
        for _ in range(8):  # the chain of causes is short; a cycle must not hang us
            if cause is None:
                break
            if isinstance(cause, ssl.SSLCertVerificationError):
                return RemoteError(self._redact(
                    f"{self.label}: TLS certificate not trusted ({cause.verify_message}); "
                    "for a private CA set backend.caBundle"))
            cause = cause.__cause__ or cause.__context__
        if isinstance(e, httpx.ConnectTimeout):
            what = f"no connection within {self.limits.connect_timeout:g} s"
        elif isinstance(e, httpx.ConnectError):
            what = f"cannot connect ({_one_line(str(e)) or type(e).__name__})"
        elif isinstance(e, httpx.TimeoutException):
            what = f"no response within {self.limits.chunk_timeout:g} s"
        else:
            what = f"connection failed ({_one_line(str(e)) or type(e).__name__})"
        return RemoteError(self._redact(f"{self.label}: {what}"))

    def _check_stream(self, response: httpx.Response) -> None:
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "text/event-stream":
            raise RemoteError(f"{self.label}: expected an event stream, got "
                              f"{kind or 'no content type'} (is backend.url the API's /v1?)")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise RemoteError(f"{self.label}: the stream is compressed ({encoding}); "
                              "this client reads identity-encoded streams only")

    async def _status_error(self, response: httpx.Response, clock: _Clock,
                            exchange: Exchange) -> RemoteError:
        status = response.status_code
        try:
            body = await self._read_some(response, clock, ERROR_BODY_BYTES, exchange)
        except (RemoteError, httpx.TransportError):
            body = b""
        exchange.release(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        detail = _error_detail(body)
        reason = response.reason_phrase or "error"
        message = f"{self.label}: HTTP {status} {reason}"
        if status in (401, 403):
            where = f"${self.api_key_env}" if self.api_key_env else "backend.apiKeyEnv (none set)"
            message += f"; check the API key in {where}"
        elif status == 404:
            message += f" for {response.request.url.path}; check backend.url and backend.model"
        elif status == 429:
            message += "; rate limited" + (f", retry after {retry_after:g} s"
                                          if retry_after is not None else "")
        if detail:
            message += f": {detail}"
        if status == 429 and retry_after is None:
            retry_after = 1.0
        return RemoteError(self._redact(message), status=status, retry_after=retry_after)

    async def _read_some(self, response: httpx.Response, clock: _Clock, limit: int,
                         exchange: Exchange) -> bytes:
        data = bytearray()
        chunks = exchange.body(response)
        while len(data) < limit:
            chunk = await clock.wait(lambda: next_chunk(chunks), self.limits.chunk_timeout,
                                     "")
            if not chunk:
                break
            data += chunk
        return bytes(data[:limit])

    async def _events(self, response: httpx.Response, clock: _Clock,
                      exchange: Exchange) -> AsyncIterator[dict[str, Any]]:
        limits = self.limits
        stalled = f"{self.label}: the stream stalled (no data for {limits.chunk_timeout:g} s)"
        chunks = exchange.body(response)
        buffer = bytearray()
        start = total = event_bytes = 0  # start: where the unread lines begin in `buffer`
        data: list[bytes] = []
        eof = False
        while True:
            newline = _find_newline(buffer, start)
            # A \r last in the buffer may be the first half of \r\n: read on to know.
            split_crlf = (newline >= 0 and newline == len(buffer) - 1 and buffer[newline] == 0x0D
                          and not eof)
            if newline < 0 or split_crlf:
                if eof:
                    raise RemoteError(f"{self.label}: the stream ended before [DONE]")
                del buffer[:start]
                start = 0
                if len(buffer) > limits.max_line_bytes:
                    raise RemoteError(f"{self.label}: a stream line over "
                                      f"{limits.max_line_bytes // 1024} KiB; stream abandoned")
                try:
                    chunk = await clock.wait(lambda: next_chunk(chunks),
                                             limits.chunk_timeout, stalled)
                except httpx.ReadTimeout:  # httpx's read timeout is the same chunk timeout
                    raise RemoteError(stalled) from None
                except httpx.TransportError as e:
                    raise self._transport_error(e) from None
                total += len(chunk)
                if total > limits.max_stream_bytes:
                    raise RemoteError(f"{self.label}: the stream exceeded "
                                      f"{limits.max_stream_bytes // MiB} MiB; stream abandoned")
                buffer += chunk
                eof = not chunk
                continue
            if newline - start > limits.max_line_bytes:
                raise RemoteError(f"{self.label}: a stream line over "
                                  f"{limits.max_line_bytes // 1024} KiB; stream abandoned")
            line = bytes(buffer[start:newline])
            start = newline + (2 if buffer[newline:newline + 2] == b"\r\n" else 1)
            if not line:  # a blank line dispatches the event
                if not data:
                    continue
                payload = b"\n".join(data)
                data, event_bytes = [], 0
                if payload.strip() == b"[DONE]":
                    return
                yield self._decode(payload)
            elif line.startswith(b":"):
                continue  # a comment, e.g. a keep-alive
            else:
                field, _, value = line.partition(b":")
                if field == b"data":
                    value = value[1:] if value.startswith(b" ") else value
                    event_bytes += len(value)
                    if event_bytes > limits.max_event_bytes:
                        raise RemoteError(f"{self.label}: an event over "
                                          f"{limits.max_event_bytes // MiB} MiB; "
                                          "stream abandoned")
                    data.append(value)

    def _decode(self, payload: bytes) -> dict[str, Any]:
        if self._key and self._key.encode() in payload:  # a server that echoes the key
            payload = payload.replace(self._key.encode(), b"***")
        try:
            value = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RemoteError(self._redact(
                f"{self.label}: malformed event ({_one_line(str(e))}): "
                f"{_excerpt(payload)}")) from None
        if not isinstance(value, dict):
            raise RemoteError(self._redact(
                f"{self.label}: malformed event (not a JSON object): {_excerpt(payload)}"))
        return value

    def _redact(self, message: str) -> str:
        if self._key:
            message = message.replace(self._key, "***")
        return message


def _find_newline(buffer: bytearray, start: int) -> int:
    n, r = buffer.find(b"\n", start), buffer.find(b"\r", start)
    if n < 0:
        return r
    return n if r < 0 else min(n, r)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _excerpt(payload: bytes) -> str:
    return _one_line(payload[:200].decode("utf-8", "replace"), 80)


def _error_detail(body: bytes) -> str:
    """The message an error body carries: OpenAI's and vLLM's `{"error": {"message"}}`,
    vLLM's older `{"message"}`, Mistral's `{"message"}` / `{"detail"}`, or the text itself."""
    text = body.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return _one_line(text) if text.strip() and "<" not in text[:1] else ""
    for candidate in (value.get("error") if isinstance(value, dict) else None, value):
        if isinstance(candidate, dict):
            for key in ("message", "detail"):
                found = candidate.get(key)
                if isinstance(found, str) and found.strip():
                    return _one_line(found)
                if isinstance(found, list) and found:  # FastAPI's validation errors
                    return _one_line(json.dumps(found))
        elif isinstance(candidate, str) and candidate.strip():
            return _one_line(candidate)
    return ""
