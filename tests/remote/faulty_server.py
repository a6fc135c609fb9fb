"""A misbehaving HTTP server for the remote layer's fault tests: stdlib asyncio, 127.0.0.1 only.

    python -m tests.remote.faulty_server [--lifetime S] [--tls CERT KEY]

prints `PORT <n>` on stdout once it listens, and exits after `--lifetime` seconds or when its
stdin closes, whichever comes first. The path picks the misbehaviour (the query string is
free: tests put a unique id there and find their request in the log):

    /ok            a valid completions stream: three text chunks, usage, [DONE]
    /status/<n>    HTTP <n> with an OpenAI-style JSON error; ?retry_after=S adds Retry-After
    /echo-key      401 whose error message quotes the Authorization header it received
    /echo-key-stream  the same inside an event of a 200 stream
    /flaky         ?fails=N&code=C: the first N requests with this query get C, then /ok
    /stall-headers reads the request and never answers
    /stall-mid     headers and one event, then silence
    /endless       a valid event every 50 ms (?interval=S), forever (chat: a delta)
    /keepalive     headers, then an SSE comment every 50 ms, forever (no event)
    /garbage       random bytes in 1 KiB lines, forever, ~6 MB/s (under the client's 64 MiB
                   stream cap within a time budget: test_http checks the cap)
    /huge-line     `data: ` and then 100 MB without a line break
    /broken-sse    an event whose data is not JSON
    /not-object    an event whose data is a JSON array
    /no-done       one event, then the connection closes without [DONE]
    /html          200 with an HTML page
    /gzip          200 event stream with Content-Encoding: gzip
    /tool-call     a chat stream recorded from vLLM 0.32 (fixtures/vllm_tool_call.sse): a forced
                   `read_file` call, arguments with vLLM's stray leading ':'; the next request
                   with the same `id=` gets /ok's answer (the tool result was read)
    GET /_log      JSON: every request seen so far (target, method, arrival time,
                   Authorization, body) and, per target, when the client disconnected
                   (times: the server's monotonic clock, and `now`)

As a backend's `url`: the API path a client appends (`/completions`, `/chat/completions`,
`/fim/completions`, `/models`) is taken off before the route is chosen, and path segments
`key=value` are read as the query (a base URL cannot carry a query):
`http://127.0.0.1:N/status/429/retry_after=7` + `/completions` is `/status/429?retry_after=7`.
`/ok` then answers in the API's shape (`choices[].text` for completions, `choices[].delta` for
chat and Mistral's FIM), and `GET .../models` lists one model, "tiny".

"Forever" ends when the client goes away (or with the server's lifetime).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNKS = ["def", " add", "(a, b)"]
API_PATHS = ("/chat/completions", "/fim/completions", "/completions", "/models")
RECORDED = Path(__file__).resolve().parent / "fixtures" / "vllm_tool_call.sse"


def split_api_path(target: str) -> tuple[str, dict[str, str], str | None]:
    """(route path, query, API path or None): see the module's docstring."""
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    path = url.path
    api = next((a for a in API_PATHS if path.endswith(a)), None)
    if api is None:
        return path, query, None
    segments = []
    for segment in path[:-len(api)].split("/"):
        key, equals, value = segment.partition("=")
        if equals:
            query[key] = value
        else:
            segments.append(segment)
    return "/".join(segments) or "/", query, api.lstrip("/")


class Server:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnects: dict[str, float] = {}
        self.flaky: dict[str, int] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        self.requests.append({"method": method, "target": target, "time": time.monotonic(),
                              "authorization": headers.get("authorization"),
                              "body": body.decode("utf-8", "replace")})
        watcher = asyncio.ensure_future(self._watch(reader, target))
        responder = asyncio.ensure_future(self._respond(method, target, writer))
        # A client that goes away ends whatever its response was doing (a stall, an endless
        # stream), as a real server's disconnect handling would.
        await asyncio.wait([watcher, responder], return_when=asyncio.FIRST_COMPLETED)
        responder.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await responder
        with contextlib.suppress(ConnectionError):
            writer.close()
        await asyncio.sleep(0.05)  # lets the watcher see the close of a finished response
        watcher.cancel()

    async def _respond(self, method: str, target: str, writer: asyncio.StreamWriter) -> None:
        await self.respond(method, target, writer)
        await writer.drain()

    async def _watch(self, reader: asyncio.StreamReader, target: str) -> None:
        """Record when the client closes its end (EOF on our read side)."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass
        self.disconnects.setdefault(target, time.monotonic())

    async def respond(self, method: str, target: str, writer: asyncio.StreamWriter) -> None:
        path, query, api = split_api_path(target)
        if method == "GET" and api == "models":
            return send(writer, 200, "application/json",
                        json.dumps({"object": "list", "data": [{"id": "tiny"}]}).encode())
        if method == "GET" and path == "/_log":
            body = json.dumps({"requests": self.requests, "disconnects": self.disconnects,
                               "now": time.monotonic()})
            return send(writer, 200, "application/json", body.encode())
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
            return send(writer, code, "application/json",
                        error_body(f"something went wrong ({code})"), extra)
        if path == "/echo-key":
            auth = next((r["authorization"] for r in reversed(self.requests)
                         if r["target"] == target), None)
            return send(writer, 401, "application/json",
                        error_body(f"Invalid authorization header: {auth}"))
        if path == "/echo-key-stream":
            auth = next((r["authorization"] for r in reversed(self.requests)
                         if r["target"] == target), None)
            start_stream(writer)
            write_event(writer, {"error": {"message": f"bad header {auth}"}})
            write_event(writer, "[DONE]")
            return end_stream(writer)
        if path == "/flaky":
            seen = self.flaky[target] = self.flaky.get(target, 0) + 1
            if seen <= int(query.get("fails", "1")):
                extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
                return send(writer, int(query.get("code", "503")), "application/json",
                            error_body("overloaded"), extra)
            path = "/ok"
        if path == "/tool-call":
            seen = self.flaky[target] = self.flaky.get(target, 0) + 1
            if seen == 1:
                start_stream(writer)
                write_chunk(writer, RECORDED.read_bytes())
                return end_stream(writer)
            path = "/ok"
        if path == "/ok":
            start_stream(writer)
            chunk = completion_chunk if api in (None, "completions") else delta_chunk
            for text in CHUNKS:
                write_event(writer, chunk(text))
            write_event(writer, chunk("", finish="stop"))
            write_event(writer, {"choices": [], "usage": {"prompt_tokens": 5,
                                                          "completion_tokens": 3,
                                                          "total_tokens": 8}})
            write_event(writer, "[DONE]")
            return end_stream(writer)
        if path == "/stall-headers":
            await asyncio.sleep(3600)
        if path == "/stall-mid":
            start_stream(writer)
            write_event(writer, completion_chunk("def"))
            await writer.drain()
            await asyncio.sleep(3600)
        if path == "/endless":
            start_stream(writer)
            chunk = completion_chunk if api in (None, "completions") else delta_chunk
            while True:
                write_event(writer, chunk("x"))
                await writer.drain()
                await asyncio.sleep(float(query.get("interval", "0.05")))
        if path == "/keepalive":
            start_stream(writer)
            while True:
                write_chunk(writer, b": keep-alive\n\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        if path == "/garbage":
            start_stream(writer)
            while True:
                block = os.urandom(64 * 1024).replace(b"\n", b"?")
                write_chunk(writer, b"\n".join(block[i:i + 1023]
                                               for i in range(0, len(block), 1023)))
                await writer.drain()
                await asyncio.sleep(0.01)
        if path == "/huge-line":
            start_stream(writer)
            write_chunk(writer, b"data: ")
            block = b"a" * 65536
            for _ in range(100 * 2**20 // len(block)):
                write_chunk(writer, block)
                await writer.drain()
            write_chunk(writer, b"\n\n")
            return end_stream(writer)
        if path == "/broken-sse":
            start_stream(writer)
            write_chunk(writer, b'data: {"choices": [{"text": "de\n\n')
            write_event(writer, "[DONE]")
            return end_stream(writer)
        if path == "/not-object":
            start_stream(writer)
            write_event(writer, [1, 2])
            write_event(writer, "[DONE]")
            return end_stream(writer)
        if path == "/no-done":
            start_stream(writer)
            write_event(writer, completion_chunk("def"))
            return end_stream(writer)
        if path == "/html":
            return send(writer, 200, "text/html; charset=utf-8",
                        b"<html><body>Login required</body></html>")
        if path == "/gzip":
            body = gzip.compress(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
            return send(writer, 200, "text/event-stream", body, {"Content-Encoding": "gzip"})
        return send(writer, 404, "application/json", error_body(f"no route {path}"))


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "test"}}).encode()


def completion_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "model": "tiny",
            "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}


def delta_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


def send(writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes,
         extra: dict[str, str] | None = None) -> None:
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
               "Connection": "close", **(extra or {})}
    writer.write(status_line(status, headers) + body)


def status_line(status: int, headers: dict[str, str]) -> bytes:
    text = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
    text += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (text + "\r\n").encode("latin-1")


def start_stream(writer: asyncio.StreamWriter) -> None:
    writer.write(status_line(200, {"Content-Type": "text/event-stream; charset=utf-8",
                                   "Transfer-Encoding": "chunked", "Connection": "close"}))


def write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def write_event(writer: asyncio.StreamWriter, value: object) -> None:
    data = value if isinstance(value, str) else json.dumps(value)
    write_chunk(writer, f"data: {data}\n\n".encode())


def end_stream(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")


async def main(lifetime: float, tls: list[str] | None) -> None:
    server = Server()
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[0], tls[1])
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.buffer.read)
    async with listener:
        await asyncio.wait([stdin_closed, asyncio.ensure_future(asyncio.sleep(lifetime))],
                           return_when=asyncio.FIRST_COMPLETED)
    os._exit(0)  # the stdin reader thread would keep a normal exit waiting


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args()
    asyncio.run(main(args.lifetime, args.tls))
