"""LSP framing under hostile input: every message after the damage is read, memory stays bounded
whatever a header says, and the dropped input is reported with the request's id when it shows."""

from __future__ import annotations

import json
import random

import pytest

from lsp_server.protocol import request_id
from lsp_server.transport import CHUNK, Dropped, Event, Frame, FrameReader

LIMIT = 1000
BODY = b'{"jsonrpc":"2.0","id":7,"method":"shutdown"}'
NEXT = b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
LARGE = b'{"id": 5, "method": "x", "params": "' + b"y" * 5000 + b'"}'
TOO_LARGE = ("message too large: Content-Length {} is over the limit of 1000 bytes "
             "(lsp_server --max-message-mib)")


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def read(data: bytes, chunks: int | None = None, seed: int = 0) -> list[Event]:
    """Events of `data` fed at once, or cut at `chunks` random places."""
    reader = FrameReader(LIMIT)
    if chunks is None:
        return reader.feed(data)
    cuts = sorted(random.Random(seed).sample(range(1, len(data)), min(chunks, len(data) - 1)))
    events: list[Event] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        events += reader.feed(data[start:end])
    return events


HOSTILE = {
    "whole messages, other headers, a bare LF, blank lines between": (
        frame(b"[1]") + b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n"
        b"Content-Length: 3\n\r\n[2]\r\n\r\n" + NEXT,
        [Frame(b"[1]"), Frame(b"[2]"), Frame(BODY)]),
    "a body longer than declared is cut short at the next header": (
        b"Content-Length: 300\r\n\r\n" + BODY + NEXT,
        [Dropped(-32700, "message shorter than its Content-Length: 300 bytes declared, the "
                 f"next message began after {len(BODY)}", BODY), Frame(BODY)]),
    "a header block without Content-Length": (
        b"Content-Type: text/json\r\n\r\n" + BODY + NEXT,
        [Dropped(-32700, "header block without Content-Length"), Frame(BODY)]),
    "an invalid Content-Length": (
        b"Content-Length: -5\r\n\r\n" + BODY + b"Content-Length: 1.5\r\n\r\n" + NEXT,
        [Dropped(-32700, "invalid Content-Length: -5"),
         Dropped(-32700, "invalid Content-Length: 1.5"), Frame(BODY)]),
    "garbage between messages, up to the next header on the same line": (
        frame(b"[1]") + b"hello\r\nworld" + NEXT,
        [Frame(b"[1]"),
         Dropped(-32700, "unexpected bytes where a message header was expected"), Frame(BODY)]),
    "a header line over 8 KiB": (
        b"X" * 10_000 + NEXT,
        [Dropped(-32700, "unexpected bytes where a message header was expected"), Frame(BODY)]),
    "10 GB declared, a short body, then the next message": (
        b"Content-Length: 10000000000\r\n\r\n" + BODY + NEXT,
        [Dropped(-32600, TOO_LARGE.format(10_000_000_000), BODY), Frame(BODY)]),
    "10^20 declared": (
        b"Content-Length: 100000000000000000000\r\n\r\n" + BODY + NEXT,
        [Dropped(-32600, TOO_LARGE.format(10**20), BODY), Frame(BODY)]),
    "5000 digits declared": (
        b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n" + BODY + NEXT,
        [Dropped(-32600, TOO_LARGE.format("of 5000 digits"), BODY), Frame(BODY)]),
    "a body over the limit, sent in full": (
        frame(LARGE) + NEXT, [Dropped(-32600, TOO_LARGE.format(len(LARGE)), LARGE[:4096]),
                              Frame(BODY)]),
    "a header written inside a JSON string is text, not a header": (
        frame(b'{"text": "Content-Length: 5\\r\\n\\r\\nabcde"}') + NEXT,
        [Frame(b'{"text": "Content-Length: 5\\r\\n\\r\\nabcde"}'), Frame(BODY)]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("chunks", [None, 3, 40, 10**9])  # 10**9: byte by byte
def test_framing_recovers_whatever_the_chunking(case: str, chunks: int | None) -> None:
    data, expected = HOSTILE[case]
    assert read(data, chunks) == expected


def test_a_huge_declared_length_is_discarded_in_bounded_memory() -> None:
    """10 MB of a body declared 1 TB go through a reader with a 1000-byte limit; it never holds
    more than one read's worth, and frames the message that follows the discarded bytes."""
    reader = FrameReader(LIMIT)
    events = reader.feed(b"Content-Length: 1000000000000\r\n\r\n")
    peak = 0
    for _ in range(10_000_000 // CHUNK):
        events += reader.feed(b"x" * CHUNK)
        peak = max(peak, reader.buffered)
    events += reader.feed(b"\r\n" + NEXT)
    assert events == [Dropped(-32600, TOO_LARGE.format(10**12), b"x" * 4096), Frame(BODY)]
    assert peak <= CHUNK + 64


def test_a_body_at_the_limit_is_delivered() -> None:
    body = b'"' + b"a" * (LIMIT - 2) + b'"'
    assert read(frame(body) + frame(body + b" ")) == [
        Frame(body), Dropped(-32600, TOO_LARGE.format(LIMIT + 1), body + b" ")]


@pytest.mark.parametrize(("head", "expected"), [
    (b'{"jsonrpc": "2.0", "id": 12, "method": "x", "params": {"a": [1, 2', 12),
    (b'{"id": "abc", "params": {"deep": {"text": "Content-Length: 9"}}, "method": "x"}', "abc"),
    (b'{"method": "x", "params": {"id": 3}, "id": 4', None),  # cut inside the id's value
    (b'{"method": "x", "params": {"id": 3}, "id": 4}', 4),  # nested ids are not the id
    (b'{"jsonrpc": "2.0", "id": 4, "result": null}', None),  # a response: nothing to answer
    (b'{"id": {"a": 1}, "method": "x"}', None),
    (b'{"id": true, "method": "x"}', None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
    (b"{" + b'"a": ' * 5000, None),
])
def test_the_request_id_is_read_from_a_body_cut_anywhere(head: bytes,
                                                         expected: int | str | None) -> None:
    assert request_id(head) == expected


def test_the_id_of_a_body_cut_at_every_byte() -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 31, "method": "textDocument/completion",
                       "params": {"textDocument": {"uri": "file:///a"}}}).encode()
    end_of_id = body.index(b"31") + 2
    for cut in range(len(body) + 1):
        # "3" alone would be the wrong id: an id counts only once a delimiter follows it
        assert request_id(body[:cut]) == (31 if cut > end_of_id else None), cut
