"""What the two remote backends (openai.py: vLLM and other OpenAI-compatible servers; mistral.py:
Mistral's API) share: their life from the settings, and how a request streams over HTTP on the
event loop. Each subclass says only what its wire format is (paths, bodies, stream parsers).

Completions and chat turns differ where it matters:

- A completion may be retried (once: a keystroke's request is idempotent and cheap; the HTTP
  layer retries only before the first byte and within the deadline), is dropped before it is
  sent when a newer request for the same document came meanwhile (`superseded`: it matters
  while the rate limiter holds it back), and is bounded by the completion's time budget (the
  completion service answers at the budget with what it has; the HTTP deadline, a second later,
  is the backstop). After a 429 with `Retry-After`, completions are not sent until then: each
  gets the same error at once instead of hammering a hosted API that said to wait.
- A chat turn is never retried (the model's answer must not be generated twice) and has the
  HTTP layer's long deadline.
- Both: closing the iterator (a newer keystroke, `$/cancelRequest`, post-processing's stop rule
  via `CompletionRequest.stop`) closes the HTTP stream at once, and the server aborts the
  generation (vLLM does on disconnect). A server that sends more chunks than `max_tokens`
  allows (each chunk holds one token or more) is cut there.

Counters: prompt and generated tokens from the server's `usage` when the stream ends normally;
a stream closed early has none, so the FIM prompt's length and the number of text chunks stand
in. `reused_tokens` is what the server says it took from its prefix cache (vLLM with
`--enable-prompt-tokens-details`), 0 otherwise.

Errors: every `RemoteError` (HTTP status, stall, malformed chunk, deadline) becomes a
`BackendError` with the same one line. The status stays "ready": the next request may work
(the server was restarting, the rate limit passed); the completion that failed reports the
message in `tramontane/status`. A misconfiguration (no tokenizer, no model name, a bad URL or
CA bundle, the API key's variable unset, a model the server does not serve) is the status
"error" with the message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import string
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..settings import BackendSettings, Settings
from ..tokenizer import PromptTokenizer, prompt_text
from . import tokenizers, wire
from .base import (
    BackendError,
    BackendStatus,
    ChatRequest,
    CompletionRequest,
    End,
    EndReason,
    Event,
    StatusListener,
    TextDelta,
    ToolCall,
    ToolCalls,
)
from .http import Limits, RemoteClient, RemoteError, Superseded

log = logging.getLogger(__name__)

COMPLETION_RETRIES = 1
# Past the completion's time budget, the HTTP deadline's margin (the service answers first).
DEADLINE_MARGIN_S = 1.0
# The models check at configure time: short, it only helps to name a wrong model early.
MODELS_CHECK_S = 3.0
# Chat turns: the longest silence between two chunks (a long prompt's prefill on a busy
# server comes first) and the whole answer.
CHAT_LIMITS = Limits(connect_timeout=5.0, chunk_timeout=60.0, deadline=600.0)

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A tool-call id in the shape Mistral's tokenizers and API require (9 of [a-zA-Z0-9])."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass(frozen=True)
class CompletionCall:
    """One completion's request for the wire, and the parser of its stream."""

    path: str
    body: dict[str, Any]
    feed: Callable[[Mapping[str, Any]], Sequence[wire.TextDelta | wire.ToolCall]]
    finish: Callable[[], wire.Finish]


class RemoteBackend(ABC):
    """A backend that streams from an HTTP server on the event loop (no engine thread)."""

    kind: ClassVar[str]
    # The backend sends the FIM prompt as text (the server tokenizes it): the tokenizer then
    # only counts tokens for the prompt windows.
    text_fim: ClassVar[bool] = False

    def __init__(self, on_status: StatusListener | None = None) -> None:
        self._on_status = on_status
        self._status = BackendStatus("idle", f"The {self.kind} backend is not configured yet")
        self._settings: BackendSettings | None = None
        self._client: RemoteClient | None = None
        self._tokenizer: PromptTokenizer | None = None
        self._model = ""
        self._budget_s = 5.0
        self._latest: dict[str, int] = {}  # per document: the sequence number of its newest
        self._sequence = 0
        self._wait_until = 0.0  # a 429's Retry-After, on the monotonic clock
        self._wait_error = ""

    # -- what the wire format says (subclasses) ---------------------------------------------------

    @abstractmethod
    def completion_call(self, model: str, request: CompletionRequest,
                        sampling: wire.Sampling) -> CompletionCall: ...

    @abstractmethod
    def chat_call(self, model: str, messages: Sequence[wire.Message], tools: Sequence[wire.Tool],
                  sampling: wire.Sampling) -> tuple[str, dict[str, Any]]: ...

    def tool_call(self, call: wire.ToolCall) -> ToolCall:
        """A streamed call as the chat loop gets it (subclasses repair known server defects)."""
        return ToolCall(call.id or new_call_id(), call.name, call.arguments)

    # -- what the server sees -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"{self._model} at {self._client.label}" if self._client and self._model \
            else self.kind

    @property
    def status(self) -> BackendStatus:
        return self._status

    @property
    def tokenizer(self) -> PromptTokenizer | None:
        return self._tokenizer

    async def configure(self, settings: Settings) -> None:
        self._budget_s = settings.completion.time_budget_ms / 1000
        wanted = settings.backend
        if wanted == self._settings and self._status.state == "ready":
            return  # another section changed
        self._settings = wanted
        await self._drop_client()
        self._tokenizer = None
        try:
            model = self._model_name(wanted)
            tokenizer, source = await asyncio.get_running_loop().run_in_executor(
                None, lambda: tokenizers.load(wanted.tokenizer, model, text_fim=self.text_fim))
            client = RemoteClient(
                wanted.url, api_key_env=wanted.api_key_env, ca_bundle=_path(wanted.ca_bundle),
                max_requests_per_second=wanted.max_requests_per_second, limits=CHAT_LIMITS)
        except (BackendError, RemoteError) as e:
            self._set_status(BackendStatus("error", str(e), _DETAILS))
            return
        if wanted != self._settings:  # the settings changed while the tokenizer loaded
            await client.aclose()
            return
        self._client, self._tokenizer, self._model = client, tokenizer, model
        self._wait_until = 0.0
        note = await self._check_model(client, model)
        if isinstance(note, BackendError):
            self._set_status(BackendStatus("error", str(note), _DETAILS))
            return
        self._set_status(BackendStatus(
            "ready", f"{model} at {client.label} ({self.kind} backend, tokenizer "
            f"{source.name} {tokenizer.version}){note}", _DETAILS))

    def complete(self, request: CompletionRequest) -> AsyncIterator[Event]:
        client = self._require_client()
        self._sequence += 1
        sequence = self._latest[request.key] = self._sequence
        return self._complete(client, request, lambda: self._latest.get(request.key) != sequence)

    def chat(self, request: ChatRequest) -> AsyncIterator[Event]:
        client = self._require_client()
        return self._chat(client, request)

    def forget(self, key: str) -> None:
        self._latest.pop(key, None)

    async def close(self) -> None:
        self._settings = None
        self._tokenizer = None
        await self._drop_client()

    # -- streaming --------------------------------------------------------------------------------

    async def _complete(self, client: RemoteClient, request: CompletionRequest,
                        superseded: Callable[[], bool]) -> AsyncIterator[Event]:
        if time.monotonic() < self._wait_until:
            left = self._wait_until - time.monotonic()
            raise BackendError(f"{self._wait_error} ({left:.0f} s left)")
        sampling = request.sampling
        call = self.completion_call(self._model, request, wire.Sampling(
            sampling.max_tokens, sampling.temperature, sampling.top_p))
        run = _Run(request.on_end, len(request.tokens))
        reason: EndReason = "stop"
        try:
            async with client.stream(call.path, scrub(call.body), retries=COMPLETION_RETRIES,
                                     superseded=superseded,
                                     deadline=self._budget_s + DEADLINE_MARGIN_S) as events:
                with run.watching():
                    async for chunk in events:
                        stopped = False
                        for item in call.feed(chunk):
                            if not isinstance(item, wire.TextDelta) or not item.text:
                                continue
                            run.chunks += 1
                            stopped = request.stop is not None and request.stop(item.text)
                            yield TextDelta(item.text)
                            if stopped:
                                break
                        if stopped:
                            break  # post-processing has its completion: close the stream
                        if run.chunks > sampling.max_tokens:
                            reason = "length"  # the server ignores max_tokens
                            break
                    else:
                        finish = call.finish()
                        run.usage = finish.usage
                        reason = _reason(finish.reason)
            yield run.end(reason)
        except Superseded:
            yield run.end("cancelled", stopped_ms=0.0)
        except RemoteError as e:
            self._note_rate_limit(e)
            run.failed()
            raise BackendError(str(e)) from None
        finally:
            run.close()

    async def _chat(self, client: RemoteClient, request: ChatRequest) -> AsyncIterator[Event]:
        sampling = request.sampling
        messages = wire_messages(request.messages)
        tools = [wire.Tool(t.name, t.description, t.parameters) for t in request.tools]
        path, body = self.chat_call(self._model, messages, tools, wire.Sampling(
            sampling.max_tokens, sampling.temperature, sampling.top_p))
        parser = wire.DeltaStream(client.label)
        run = _Run(request.on_end, 0)
        calls: list[ToolCall] = []
        reason: EndReason = "stop"
        try:
            async with client.stream(path, scrub(body)) as events:
                with run.watching():
                    async for chunk in events:
                        for item in parser.feed(chunk):
                            if isinstance(item, wire.ToolCall):
                                calls.append(self.tool_call(item))
                            elif item.text:
                                run.chunks += 1
                                yield TextDelta(item.text)
                        if run.chunks > sampling.max_tokens:
                            reason = "length"  # the server ignores max_tokens
                            break
                    else:
                        pending, finish = parser.finish()
                        calls += [self.tool_call(c) for c in pending]
                        run.usage = finish.usage
                        reason = _reason(finish.reason)
            if calls:
                yield ToolCalls(tuple(calls))
            yield run.end(reason)
        except RemoteError as e:
            run.failed()
            raise BackendError(str(e)) from None
        finally:
            run.close()

    # -- the backend's life ------------------------------------------------------------------------

    def _model_name(self, settings: BackendSettings) -> str:
        if settings.model is None:
            raise BackendError(f"backend.model is not set: name the model the {self.kind} "
                               "server serves (vLLM's --served-model-name, or e.g. "
                               "codestral-latest on Mistral's API)")
        return settings.model

    async def _check_model(self, client: RemoteClient, model: str) -> str | BackendError:
        """`GET models`: a model the server does not serve is an error now rather than a 404 at
        every keystroke; a server that cannot be asked (not up yet, no such endpoint) is a
        note, since requests may still work later."""
        try:
            answer = await client.get_json("models", deadline=MODELS_CHECK_S)
        except RemoteError as e:
            return f"; could not list its models ({e})"
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            return ""
        served = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        aliases = {a for m in data if isinstance(m, dict)
                   for a in (m.get("aliases") or []) if isinstance(a, str)}
        if model in served or model in aliases:
            return ""
        shown = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
        return BackendError(f"backend.model {model!r} is not served at {client.label} (it "
                            f"serves: {shown or 'nothing'})")

    def _note_rate_limit(self, error: RemoteError) -> None:
        if error.status == 429 and error.retry_after:
            self._wait_until = time.monotonic() + error.retry_after
            self._wait_error = f"{error}; not sending until then"

    def _require_client(self) -> RemoteClient:
        if self._client is None:
            raise BackendError(self._status.message if self._status.state == "error"
                               else f"the {self.kind} backend is not configured")
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _set_status(self, status: BackendStatus) -> None:
        self._status = status
        if self._on_status is not None:
            self._on_status(status)


# `tramontane/status` carries the same fields for every backend; the compiled decode step is the
# in-process engine's (a remote server's speed is its own business).
_DETAILS = {"fastDecode": False}


class _Run:
    """One request's counters, and the `on_end` call made exactly once: at its end, or when the
    consumer stopped iterating (cancelled) or it failed."""

    def __init__(self, on_end: Callable[[End], None] | None, prompt_tokens: int) -> None:
        self._on_end = on_end
        self._prompt_tokens = prompt_tokens
        self._started = time.perf_counter()
        self._cancelled_at: float | None = None
        self._done = False
        self.chunks = 0
        self.usage: wire.Usage | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Around the reading (inside the HTTP stream's context): notes when a cancel arrives,
        before the stream is closed."""
        try:
            yield
        except (GeneratorExit, asyncio.CancelledError):
            self._cancelled_at = time.monotonic()
            raise

    def end(self, reason: EndReason, stopped_ms: float | None = None) -> End:
        usage = self.usage
        prompt = usage.prompt_tokens if usage else self._prompt_tokens
        generated = usage.completion_tokens if usage else self.chunks
        cached = min(usage.cached_tokens, prompt) if usage else 0
        end = End(reason, prompt, cached, prompt - cached + generated, generated,
                  time.perf_counter() - self._started, stopped_ms)
        self._report(end)
        return end

    def failed(self) -> None:
        """No `on_end` for a request that failed (as the local backend): its error is the
        report."""
        self._done = True

    def close(self) -> None:
        """The consumer stopped iterating (or the task was cancelled): the stream is closed by
        now; `stopped_ms` is how long closing took after the cancel."""
        if self._done:
            return
        at = self._cancelled_at
        stopped = (time.monotonic() - at) * 1000 if at is not None else 0.0
        self._report(End("cancelled", self._prompt_tokens, 0, self._prompt_tokens + self.chunks,
                         self.chunks, time.perf_counter() - self._started, stopped))

    def _report(self, end: End) -> None:
        if self._done:
            return
        self._done = True
        if self._on_end is not None:
            self._on_end(end)


def scrub(value: Any) -> Any:
    """`value` with every string as a prompt can take it (lone UTF-16 surrogates, which a JSON
    `\ud800` from the editor can carry, become U+FFFD, as in the local backend's prompts; UTF-8
    cannot encode them)."""
    if isinstance(value, str):
        return prompt_text(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def _reason(finish: str) -> EndReason:
    """The server's finish reason in ours: "length" stays, "abort" is a cancel, the rest
    ("stop", "tool_calls", a stop string) is a stop."""
    if finish == "length":
        return "length"
    return "cancelled" if finish == "abort" else "stop"


def _path(value: str | None) -> str | None:
    return str(Path(value).expanduser()) if value is not None else None


def wire_messages(messages: Sequence[Mapping[str, Any]]) -> list[wire.Message]:
    """The chat loop's messages (OpenAI/Mistral shape, checked by chat/params.py) as the wire
    formats take them. A message's text parts are joined in order and its images follow them
    (the wire formats put text first); an assistant message with neither text nor tool calls
    says nothing and is left out, as the local backend does (Mistral's validation refuses it).
    Images must be `data:` URIs: no URL is handed to a server to fetch."""
    out = []
    for message in messages:
        role = message.get("role")
        texts, images = _content(message.get("content"))
        calls = tuple(_call(c) for c in message.get("tool_calls") or ())
        if role == "assistant" and not texts and not calls:
            continue
        if role not in ("system", "user", "assistant", "tool"):
            raise BackendError(f"invalid conversation: unknown role {role!r}")
        call_id, name = message.get("tool_call_id"), message.get("name")
        out.append(wire.Message(
            role, "".join(texts), tuple(images), calls,
            call_id if isinstance(call_id, str) else None,
            name if isinstance(name, str) else None))
    return out


def _content(content: object) -> tuple[list[str], list[wire.Image]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return ([content] if content else []), []
    texts: list[str] = []
    images: list[wire.Image] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_image(url))
    return texts, images


def _image(url: object) -> wire.Image:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BackendError("only data: URIs are accepted for images (no URL is fetched)")
    header, _, data = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if encoding != "base64" or not mime.startswith("image/"):
        raise BackendError("an image must be a base64 data: URI of an image type "
                           "(data:image/png;base64,...)")
    try:
        return wire.Image(base64.b64decode(data, validate=True), mime)
    except (binascii.Error, ValueError):
        raise BackendError("an image's data: URI is not valid base64") from None


def _call(call: object) -> wire.ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function, dict):
        raise BackendError("invalid conversation: a tool call must be {id, function: {name, "
                           "arguments}}")
    return wire.ToolCall(str(call.get("id") or ""), str(function.get("name") or ""),
                         str(function.get("arguments") or ""))
