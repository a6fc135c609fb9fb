"""The byte stream under JSON-RPC: LSP's framing, read by us, and a session that ends the
process at once.

We replace pygls' reader loop (`pygls/io_.py`, `run_async`), the layer where framing lives, and
keep its protocol object for everything above it. That loop reads header lines with an
unbounded `readline()` and a body with one `read(Content-Length)`: a header of 10 GB reserves
10 GB and waits, 10^20 raises `OverflowError`/`MemoryError` out of the loop; a body shorter
than its header swallows the next message and misframes every later one; a header block
without `Content-Length` or stray bytes between messages leave the session dead while the
process lives. `FrameReader` below recovers from all of these, and its memory is bounded by
the message size limit whatever the client sends.

Ending: `exit`, the end of the input stream (the editor quit or crashed) and SIGTERM/SIGINT
end the process within milliseconds, with code 0 after `shutdown` and 1 otherwise, whatever
the engine thread is doing (see `terminate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from .protocol import INVALID_REQUEST, PARSE_ERROR

if TYPE_CHECKING:
    from types import FrameType

    from pygls.lsp.server import LanguageServer

    from .protocol import TramontaneProtocol

log = logging.getLogger(__name__)

MIB = 2**20
DEFAULT_MAX_MESSAGE_MIB = 64
CHUNK = 64 * 1024  # bytes read at a time
MAX_HEADER_LINE = 8 * 1024
MAX_HEADER_LINES = 32  # per header block
HEAD_BYTES = 4 * 1024  # kept of a discarded body, to find the request's id in it

_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
_NEXT_HEADER = re.compile(rb"content-length:", re.IGNORECASE)
# A whole `Content-Length` header line with its raw line break. It cannot occur inside a valid
# JSON text: outside strings JSON has no letters, inside them no raw line break. So finding one
# in a body proves the body was shorter than declared, and the next message starts there.
_HEADER_IN_BODY = re.compile(rb"content-length:[ \t]{0,8}[0-9]{1,30}[ \t]{0,8}\r?\n",
                             re.IGNORECASE)
_OVERLAP = 64  # longer than any match of _HEADER_IN_BODY: rescanned when more bytes arrive


@dataclass(frozen=True)
class Frame:
    body: bytes


@dataclass(frozen=True)
class Dropped:
    """Bytes not delivered as a message. The client is told `code` and `message`, with the
    request's id when `head` (the start of the dropped body, if any) shows one."""

    code: int
    message: str
    head: bytes = b""


Event = Frame | Dropped


class FrameReader:
    """LSP base-protocol framing, sans I/O: `feed(bytes)` returns the events those bytes
    complete. Whatever arrives, it holds at most one body up to the limit, plus one chunk.

    - A header block is `Name: value` lines, each ended by CRLF (a bare LF is accepted), then
      an empty line; it must carry `Content-Length` (decimal digits). Other headers
      (`Content-Type`) are ignored, and so are empty lines between messages.
    - Resynchronisation: a line that is not a header, a header line over 8 KiB, or a block
      without a valid `Content-Length` is reported once (-32700) and skipped, with whatever
      follows it, up to the next `Content-Length:`.
    - A body is cut short where a whole `Content-Length: N` line appears inside it (see
      `_HEADER_IN_BODY`): -32700 for the short message, and the next one is read from there.
    - A `Content-Length` over `max_bytes` is only compared, never allocated: -32600 as soon as
      the first 4 KiB of the body are in (they may name the request's id), and the body is
      discarded chunk by chunk as it arrives (or up to a header found inside it).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._state = self._header
        self._block: list[tuple[bytes, bytes]] = []  # the header lines read so far
        self._length = 0  # the body's declared length (body and discard states)
        self._declared = ""  # the same, as the client wrote it (for messages)
        self._scanned = 0  # how far the body in `_buf` was searched for a header
        self._skip_from = 0  # resync: where to search `_buf` for the next header
        self._reported = False  # discard: the Dropped event is out

    @property
    def buffered(self) -> int:
        """Bytes held: at most one body within the limit, plus what one read brought."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while self._state(events):
            pass
        return events

    # Each state consumes what it can and returns True when the next state should run now,
    # False when it needs more bytes.

    def _header(self, events: list[Event]) -> bool:
        buf = self._buf
        end = buf.find(b"\n", 0, MAX_HEADER_LINE + 1)
        if end < 0:
            if len(buf) > MAX_HEADER_LINE:
                return self._resync(events, "unexpected bytes where a message header was "
                                    "expected")
            return False
        line = bytes(buf[:end]).rstrip(b"\r")
        if not line:
            del buf[:end + 1]
            return self._block_done(events) if self._block else True
        header = _HEADER.fullmatch(line)
        if header is None:
            return self._resync(events, "unexpected bytes where a message header was expected")
        del buf[:end + 1]
        self._block.append((header[1].lower(), header[2]))
        if len(self._block) > MAX_HEADER_LINES:
            return self._resync(events, "too many header lines", skip_from=0)
        return True

    def _block_done(self, events: list[Event]) -> bool:
        values = [value for name, value in self._block if name == b"content-length"]
        self._block = []
        if not values:
            return self._resync(events, "header block without Content-Length", skip_from=0)
        value = values[-1]
        if not value.isdigit() or any(other != value for other in values):
            shown = b", ".join(values).decode("latin-1")
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            return self._resync(events, f"invalid Content-Length: {shown}", skip_from=0)
        # Never int() a long digit string (Python refuses over 4300 digits): anything over
        # 30 digits is over any limit anyway.
        self._length = int(value) if len(value) <= 30 else 10**30
        self._declared = value.decode() if len(value) <= 30 else f"of {len(value)} digits"
        self._scanned = 0
        if self._length > self.max_bytes:
            self._reported = False
            self._state = self._discard
        else:
            self._state = self._body
        return True

    def _resync(self, events: list[Event], message: str, skip_from: int = 1) -> bool:
        """Report, then skip to the next `Content-Length:` (searching from `skip_from`, so that a
        bad header line is not found again)."""
        events.append(Dropped(PARSE_ERROR, message))
        self._block = []
        self._skip_from = skip_from
        self._state = self._skip
        return True

    def _skip(self, events: list[Event]) -> bool:
        buf = self._buf
        found = _NEXT_HEADER.search(buf, self._skip_from)
        if found is None:
            keep = len(_NEXT_HEADER.pattern) - 1  # a header may start in the last bytes
            del buf[:max(0, len(buf) - keep)]
            self._skip_from = 0
            return False
        del buf[:found.start()]
        self._state = self._header
        return True

    def _next_header_in_body(self, end: int) -> int | None:
        """Where a header starts inside `_buf[:end]`, the part of the body in hand."""
        found = _HEADER_IN_BODY.search(self._buf, max(0, self._scanned - _OVERLAP), end)
        self._scanned = end
        return None if found is None else found.start()

    def _body(self, events: list[Event]) -> bool:
        buf = self._buf
        cut = self._next_header_in_body(min(len(buf), self._length))
        if cut is not None:
            events.append(Dropped(
                PARSE_ERROR, f"message shorter than its Content-Length: {self._declared} "
                f"bytes declared, the next message began after {cut}", bytes(buf[:cut])))
            del buf[:cut]
            self._state = self._header
            return True
        if len(buf) < self._length:
            return False
        events.append(Frame(bytes(buf[:self._length])))
        del buf[:self._length]
        self._state = self._header
        return True

    def _discard(self, events: list[Event]) -> bool:
        buf = self._buf
        in_hand = min(len(buf), self._length)
        cut = self._next_header_in_body(in_hand)
        whole = in_hand == self._length
        if not self._reported:
            if cut is None and not whole and in_hand < HEAD_BYTES:
                return False  # wait for the head: it may name the request
            events.append(Dropped(
                INVALID_REQUEST, f"message too large: Content-Length {self._declared} is over "
                f"the limit of {self.max_bytes} bytes (lsp_server --max-message-mib)",
                bytes(buf[:min(HEAD_BYTES, in_hand if cut is None else cut)])))
            self._reported = True
        if cut is not None:
            del buf[:cut]
            self._state = self._header
            return True
        # Drop what is in hand, but keep a tail that a header may start in (unless the body
        # is complete): it stays counted in `_length` until dropped.
        drop = in_hand if whole else max(0, in_hand - _OVERLAP)
        del buf[:drop]
        self._length -= drop
        self._scanned = in_hand - drop
        if self._length == 0:
            self._state = self._header
            return True
        return False


# --- sessions --------------------------------------------------------------------------------


def terminate(code: int, flush: Callable[[], None] | None = None) -> NoReturn:
    """End the process now, with `code`.

    Not `sys.exit`: interpreter shutdown joins every worker thread (concurrent.futures' exit
    hook), so it would wait for the engine thread, which nothing can interrupt (a compile takes
    seconds to a minute, a long prefill seconds). What must survive is flushed first: the
    protocol stream (`flush`) and the log handlers.
    """
    for flusher in (flush, *(h.flush for h in logging.getLogger().handlers), sys.stderr.flush):
        # A closed or broken stream (or one a signal interrupted): nothing more to save there.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            if flusher is not None:
                flusher()
    os._exit(code)


class _StdoutWriter:
    """pygls' writer interface over our stdout. A write to a client that is gone ends the
    session instead of raising into whichever handler was replying."""

    def __init__(self, stream: BinaryIO, lost: Callable[[], None]) -> None:
        self._stream = stream
        self._lost = lost
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):  # BrokenPipeError, or the stream was closed
                self._lost()

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        pass  # the process ends through `terminate`, which flushes


class _TcpWriter:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def flush(self) -> None:
        pass  # asyncio's transport writes when it can; nothing to force

    def close(self) -> None:
        pass


class _Session:
    """Feeds framing events to the protocol on the event loop; resolves `ended` with the exit
    code when the session is over."""

    def __init__(self, server: LanguageServer, max_message_bytes: int) -> None:
        self.protocol: TramontaneProtocol = server.protocol  # type: ignore[assignment]
        self.reader = FrameReader(max_message_bytes)
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[int] = self.loop.create_future()
        self.flush: Callable[[], None] | None = None
        self.protocol.on_exit = self.end

    def deliver(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Frame):
                self.protocol.receive(event.body)
            else:
                log.warning("dropped input: %s", event.message)
                self.protocol.reject(event.code, event.message, event.head)

    def end(self, code: int | None = None) -> None:
        """Thread-safe; the first call wins. `None`: 0 after `shutdown`, 1 otherwise."""
        def resolve() -> None:
            if not self.ended.done():
                self.ended.set_result(self.protocol.exit_code if code is None else code)

        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.loop.call_soon_threadsafe(resolve)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT end the process from the signal handler itself, not through the event
        loop: the loop may be busy (parsing a large message, or blocked writing to a client that
        does not read)."""
        log.info("signal %d: exiting", signum)
        terminate(self.protocol.exit_code, self.flush)

    async def finish(self) -> NoReturn:
        code = await self.ended
        log.info("session over: exit code %d", code)
        terminate(code, self.flush)


def _read_stdin(session: _Session, fd: int) -> None:
    """The reader thread: blocking reads of stdin, each batch of events handed to the loop and
    waited for (so at most one body is in memory, as with pygls' loop)."""
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError as e:
            log.info("stdin unreadable (%s): ending the session", e)
            data = b""
        if not data:
            session.end()  # the client closed our stdin: it is gone
            return
        try:
            events = session.reader.feed(data)
        except Exception:
            # A bug in the framing must not leave a live process with a dead session: end it
            # (editors restart a server that exits), with the traceback in the log.
            log.exception("framing failed: ending the session")
            session.end()
            return
        if not events:
            continue
        handled = threading.Event()

        def deliver(batch: list[Event] = events, handled: threading.Event = handled) -> None:
            try:
                session.deliver(batch)
            finally:
                handled.set()

        try:
            session.loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            return  # the loop is closed
        handled.wait()


def _install_signal_handlers(session: _Session) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, session.on_signal)


def serve_stdio(server: LanguageServer, stdin: BinaryIO, stdout: BinaryIO,
                max_message_bytes: int) -> NoReturn:
    async def main() -> NoReturn:
        session = _Session(server, max_message_bytes)
        writer = _StdoutWriter(stdout, session.end)
        session.flush = writer.flush
        server.protocol.set_writer(writer)
        _install_signal_handlers(session)
        threading.Thread(target=_read_stdin, args=(session, stdin.fileno()), daemon=True,
                         name="tramontane-stdin").start()
        await session.finish()

    asyncio.run(main())
    raise AssertionError("unreachable: the session ends the process")


def serve_tcp(server: LanguageServer, host: str, port: int,
              max_message_bytes: int) -> NoReturn:
    """One client connection, as pygls serves it; the process ends when it closes."""
    async def main() -> NoReturn:
        session = _Session(server, max_message_bytes)
        busy = False

        async def connection(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
            nonlocal busy
            if busy:
                writer.close()
                return
            busy = True
            server.protocol.set_writer(_TcpWriter(writer))
            while True:
                try:
                    data = await reader.read(CHUNK)
                except ConnectionError:
                    data = b""
                if not data:
                    session.end()
                    return
                session.deliver(session.reader.feed(data))

        listener = await asyncio.start_server(connection, host, port)
        log.info("listening on %s", ", ".join(str(s.getsockname()) for s in listener.sockets))
        _install_signal_handlers(session)
        await session.finish()

    asyncio.run(main())
    raise AssertionError("unreachable: the session ends the process")
