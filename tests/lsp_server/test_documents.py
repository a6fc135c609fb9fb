"""The document store keeps the exact text, and maps LSP positions onto it in every encoding."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol.types import (
    Position,
    PositionEncodingKind,
    Range,
    TextDocumentContentChangePartial,
    TextDocumentContentChangeWholeDocument,
)

from lsp_server.documents import (
    ChangeError,
    ContentChange,
    Document,
    DocumentError,
    DocumentStore,
    PositionError,
    UnknownDocumentError,
    UnsupportedEncodingError,
    VersionError,
    position_encoding,
)

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
ENCODINGS = [UTF8, UTF16, UTF32]
URI = "file:///project/main.py"


def pos(line: int, character: int) -> Position:
    return Position(line=line, character=character)


def edit(start: tuple[int, int], end: tuple[int, int], text: str) -> ContentChange:
    return TextDocumentContentChangePartial(
        range=Range(start=pos(*start), end=pos(*end)), text=text
    )


def doc(text: str) -> Document:
    return Document(URI, "python", 1, text)


# --- Line breaks ---------------------------------------------------------------------------


def test_only_lf_crlf_and_cr_break_lines() -> None:
    # str.splitlines() would find 10 lines here; LSP says 4.
    text = "a\fb\vc\n\x1cd\x1d\x1e\x85e\n\u2028f\u2029\n😀g"
    document = doc(text)
    assert document.line_count == 4
    assert [document.line_text(n) for n in range(4)] == [
        "a\fb\vc",
        "\x1cd\x1d\x1e\x85e",
        "\u2028f\u2029",
        "😀g",
    ]
    assert document.offset_at(pos(1, 5), UTF16) == text.index("e")
    assert document.offset_at(pos(2, 1), UTF16) == text.index("f")
    assert document.offset_at(pos(3, 2), UTF16) == text.index("g")
    assert document.position_at(text.index("g"), UTF8) == pos(3, 4)
    # \x85, U+2028 and U+2029 are 2, 3 and 3 UTF-8 bytes.
    assert document.offset_at(pos(1, 6), UTF8) == text.index("e")
    assert document.offset_at(pos(2, 3), UTF8) == text.index("f")


def test_crlf_is_one_break_and_lone_cr_is_one_too() -> None:
    text = "ab\r\ncd\ref\n\r\ngh"
    document = doc(text)
    assert document.line_count == 5
    assert [document.line_text(n) for n in range(5)] == ["ab", "cd", "ef", "", "gh"]
    assert [document.offset_at(pos(n, 0), UTF16) for n in range(5)] == [0, 4, 7, 10, 12]
    assert document.offset_at(pos(0, 2), UTF16) == 2  # end of line 0 is before "\r\n"
    assert document.line_span(0) == (0, 2)
    assert document.line_span(3) == (10, 10)


def test_cr_then_lf_across_lines_are_two_breaks() -> None:
    document = doc("\n\r\r\n")  # "\n", "\r", "\r\n": three breaks, four lines
    assert document.line_count == 4
    assert [document.line_text(n) for n in range(4)] == ["", "", "", ""]


def test_text_ending_with_a_break_has_an_empty_last_line() -> None:
    for text in ("a\n", "a\r\n", "a\r"):
        document = doc(text)
        assert document.line_count == 2
        assert document.line_text(1) == ""
        assert document.offset_at(pos(1, 0), UTF16) == len(text)
        assert document.position_at(len(text), UTF16) == pos(1, 0)
        with pytest.raises(PositionError, match=r"line 2 does not exist: the document has 2"):
            document.offset_at(pos(2, 0), UTF16)


def test_empty_document_has_one_empty_line() -> None:
    document = doc("")
    assert document.line_count == 1
    assert document.line_text(0) == ""
    assert document.offset_at(pos(0, 0), UTF16) == 0
    assert document.position_at(0, UTF16) == pos(0, 0)


def test_offset_between_cr_and_lf_maps_to_the_line_end() -> None:
    document = doc("ab\r\ncd")
    assert document.position_at(3, UTF16) == pos(0, 2)
    assert document.position_at(4, UTF16) == pos(1, 0)


# --- Encodings -----------------------------------------------------------------------------

# "😀" is astral: 2 UTF-16 units, 4 UTF-8 bytes. "中" is 1 UTF-16 unit, 3 UTF-8 bytes.
LINE = "x😀中𝔘y"


@pytest.mark.parametrize(
    ("encoding", "before_y"),
    [(UTF16, 1 + 2 + 1 + 2), (UTF8, 1 + 4 + 3 + 4), (UTF32, 1 + 1 + 1 + 1)],
)
def test_astral_and_cjk_characters_before_the_cursor(encoding: str, before_y: int) -> None:
    document = doc("first line\n" + LINE + "\n")
    y = len("first line\n") + LINE.index("y")
    assert document.offset_at(pos(1, before_y), encoding) == y
    assert document.position_at(y, encoding) == pos(1, before_y)
    assert document.offset_at(pos(1, before_y + 1), encoding) == y + 1  # line end
    with pytest.raises(PositionError, match=rf"which is {before_y + 1} {encoding} code units"):
        document.offset_at(pos(1, before_y + 2), encoding)


def test_encoding_accepts_the_lsprotocol_enum_and_plain_strings() -> None:
    document = doc("😀y")
    assert document.offset_at(pos(0, 2), PositionEncodingKind.Utf16) == 1
    assert document.offset_at(pos(0, 4), PositionEncodingKind.Utf8) == 1
    assert document.offset_at(pos(0, 1), PositionEncodingKind.Utf32) == 1
    assert position_encoding(None) is PositionEncodingKind.Utf16
    assert position_encoding("utf-8") is PositionEncodingKind.Utf8


def test_unsupported_encoding_is_rejected() -> None:
    with pytest.raises(UnsupportedEncodingError, match=r"'latin-1'.*supported: 'utf-8'"):
        doc("a").offset_at(pos(0, 0), "latin-1")


def test_position_inside_a_surrogate_pair() -> None:
    document = doc("a😀b")
    with pytest.raises(PositionError, match=r"character 2\) falls inside a surrogate pair"):
        document.offset_at(pos(0, 2), UTF16)
    assert document.offset_at(pos(0, 2), UTF16, clamp=True) == 1
    assert document.offset_at(pos(0, 3), UTF16) == 2


@pytest.mark.parametrize("character", [2, 3, 4])
def test_position_inside_a_utf8_sequence(character: int) -> None:
    document = doc("a😀b")  # "😀" takes bytes 1-4
    with pytest.raises(PositionError, match=r"falls inside a UTF-8 sequence"):
        document.offset_at(pos(0, character), UTF8)
    assert document.offset_at(pos(0, character), UTF8, clamp=True) == 1


@pytest.mark.parametrize(("encoding", "character"), [(UTF16, 2), (UTF8, 4), (UTF32, 2)])
def test_lone_surrogate_counts_as_one_unit(encoding: str, character: int) -> None:
    # JSON can carry an unpaired "\\ud800"; it is one UTF-16 unit, 3 "surrogatepass" bytes.
    document = doc("a\ud800b")
    assert document.offset_at(pos(0, character), encoding) == 2
    assert document.position_at(2, encoding) == pos(0, character)


# --- Out-of-range positions ----------------------------------------------------------------


def test_character_past_the_line_end_raises_with_bounds_or_clamps() -> None:
    document = doc("abc\nde")
    with pytest.raises(
        PositionError,
        match=r"\(line 0, character 4\) is past the end of line 0, which is 3 utf-16 code units "
        r"long \(valid characters: 0-3\)",
    ):
        document.offset_at(pos(0, 4), UTF16)
    assert document.offset_at(pos(0, 99), UTF16, clamp=True) == 3
    assert document.offset_at(pos(1, 99), UTF16, clamp=True) == 6


def test_line_past_the_last_line_raises_with_bounds_or_clamps() -> None:
    document = doc("abc\nde")
    with pytest.raises(
        PositionError, match=r"line 5 does not exist: the document has 2 lines \(0-1\)"
    ):
        document.offset_at(pos(5, 0), UTF16)
    assert document.offset_at(pos(5, 0), UTF16, clamp=True) == 6
    with pytest.raises(PositionError, match=r"line 2 does not exist"):
        document.line_text(2)


def test_offsets_outside_the_text_raise() -> None:
    document = doc("abc")
    for offset in (-1, 4):
        with pytest.raises(PositionError, match=r"valid offsets: 0-3"):
            document.position_at(offset, UTF16)
        with pytest.raises(PositionError):
            document.text_before(offset)
    assert (document.text_before(1), document.text_after(1)) == ("a", "bc")


# --- Changes -------------------------------------------------------------------------------


def test_insert_delete_and_replace_keep_lines_right() -> None:
    document = doc("def f():\n    return 1\n")
    document.apply_change(edit((1, 11), (1, 12), "😀 + 2"), UTF16)
    assert document.text == "def f():\n    return 😀 + 2\n"
    document.apply_change(edit((0, 8), (1, 4), " "), UTF16)
    assert document.text == "def f(): return 😀 + 2\n"
    assert document.line_count == 2
    document.apply_change(edit((0, 16), (0, 20), "3"), UTF8)  # the emoji is 4 UTF-8 bytes
    assert document.text == "def f(): return 3 + 2\n"
    document.apply_change(edit((1, 0), (1, 0), "x\r\ny"), UTF16)
    assert [document.line_text(n) for n in range(document.line_count)] == [
        "def f(): return 3 + 2",
        "x",
        "y",
    ]


def test_deleting_between_cr_and_lf_joins_them_into_one_break() -> None:
    document = doc("a\rX\nb")
    assert document.line_count == 3
    document.apply_change(edit((1, 0), (1, 1), ""), UTF16)
    assert document.text == "a\r\nb"
    assert document.line_count == 2
    assert document.line_text(1) == "b"


def test_inserting_lf_after_a_lone_cr_joins_them() -> None:
    document = doc("a\rb")
    document.apply_change(edit((1, 0), (1, 0), "\n"), UTF16)
    assert document.text == "a\r\nb"
    assert [document.line_text(n) for n in range(document.line_count)] == ["a", "b"]


def test_whole_document_change_replaces_everything() -> None:
    document = doc("old\ntext")
    document.apply_change(TextDocumentContentChangeWholeDocument(text="new\r\n"), UTF16)
    assert document.text == "new\r\n"
    assert document.line_count == 2


def test_reversed_or_out_of_range_change_raises_and_changes_nothing() -> None:
    document = doc("abc\ndef")
    with pytest.raises(
        PositionError,
        match=r"range start \(line 1, character 1\) comes after its end \(line 0, character 2\)",
    ):
        document.apply_change(edit((1, 1), (0, 2), "x"), UTF16)
    with pytest.raises(PositionError, match=r"past the end of line 1"):
        document.apply_change(edit((1, 1), (1, 9), "x"), UTF16)
    assert document.text == "abc\ndef"
    assert document.line_count == 2


# --- Store ---------------------------------------------------------------------------------


def test_store_opens_changes_and_closes() -> None:
    store = DocumentStore()
    opened = store.open(URI, "python", 3, "print(1)\n")
    assert store.get(URI) is opened
    changed = store.change(URI, 4, [edit((0, 6), (0, 7), "2")], UTF16)
    assert (changed.text, changed.version, changed.language_id) == ("print(2)\n", 4, "python")
    assert store.get(URI) is changed
    assert (opened.text, opened.version) == ("print(1)\n", 3)  # snapshots never change
    store.close(URI)
    assert URI not in store


def test_store_applies_the_changes_of_one_notification_in_order() -> None:
    store = DocumentStore()
    store.open(URI, "python", 1, "abc")
    changes = [edit((0, 3), (0, 3), "\nd"), edit((1, 1), (1, 1), "e"), edit((0, 0), (0, 1), "")]
    assert store.change(URI, 2, changes, UTF16).text == "bc\nde"


def test_invalid_change_rejects_the_whole_notification() -> None:
    store = DocumentStore()
    store.open(URI, "python", 1, "abc")
    changes = [edit((0, 0), (0, 0), "x"), edit((0, 9), (0, 9), "y"), edit((0, 0), (0, 0), "z")]
    with pytest.raises(ChangeError, match=r"change 2 of 3 is invalid, none applied: .*past") as e:
        store.change(URI, 2, changes, UTF16)
    assert e.value.index == 1
    assert isinstance(e.value.__cause__, PositionError)
    assert (store.get(URI).text, store.get(URI).version) == ("abc", 1)


@pytest.mark.parametrize("version", [4, 5])
def test_version_not_newer_is_rejected(version: int) -> None:
    store = DocumentStore()
    store.open(URI, "python", 5, "abc")
    with pytest.raises(VersionError, match=rf"version {version}, not newer than .* version 5"):
        store.change(URI, version, [edit((0, 0), (0, 0), "x")], UTF16)
    assert (store.get(URI).text, store.get(URI).version) == ("abc", 5)


def test_unknown_uri_raises_a_key_error_with_a_clear_message() -> None:
    store = DocumentStore()
    for call in (
        lambda: store.get(URI),
        lambda: store.close(URI),
        lambda: store.change(URI, 1, [], UTF16),
    ):
        with pytest.raises(UnknownDocumentError) as e:
            call()
        assert isinstance(e.value, KeyError) and isinstance(e.value, DocumentError)
        assert (
            str(e.value) == f"document {URI} is not open (no didOpen received, or already closed)"
        )


def test_reopening_replaces_the_document_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    store = DocumentStore()
    store.open(URI, "python", 7, "old")
    with caplog.at_level(logging.WARNING, logger="lsp_server.documents"):
        store.open(URI, "python", 1, "new")
    assert (store.get(URI).text, store.get(URI).version) == ("new", 1)
    assert f"didOpen for {URI}, which is already open" in caplog.text


# --- Property tests against a reference model ----------------------------------------------

# "¶" stands for "\r\n", so that one string draw (fast in Hypothesis) can hold both kinds of break.
ALPHABET = "aZ (\t\n¶\r\f\v\x1c\x85\u2028\u2029é中語😀𝔘"
_BREAK = re.compile(r"(\r\n|\r|\n)")


def units(char: str, encoding: str) -> int:
    if encoding == UTF16:
        return len(char.encode("utf-16-le")) // 2
    if encoding == UTF8:
        return len(char.encode("utf-8"))
    return 1


@dataclass
class Reference:
    """Obviously correct and slow: split the text into lines and walk them char by char."""

    text: str
    encoding: str

    def lines(self) -> list[str]:
        return _BREAK.split(self.text)[::2]

    def boundaries(self, line: int) -> list[int]:
        """Characters (in code units) that fall between two code points of `line`."""
        result = [0]
        for char in self.lines()[line]:
            result.append(result[-1] + units(char, self.encoding))
        return result

    def offsets(self) -> dict[tuple[int, int], int]:
        """Every valid (line, character) and its offset."""
        table = {}
        parts = _BREAK.split(self.text)  # line, break, line, break, ..., line
        offset = 0
        for line, text in enumerate(parts[::2]):
            character = 0
            for char in text:
                table[line, character] = offset
                character += units(char, self.encoding)
                offset += 1
            table[line, character] = offset
            if 2 * line + 1 < len(parts):
                offset += len(parts[2 * line + 1])
        return table

    def offset(self, position: Position) -> int | None:
        """The offset of a position, or None if the position is invalid."""
        return self.offsets().get((position.line, position.character))

    def valid_positions(self) -> list[Position]:
        return [pos(line, character) for line, character in self.offsets()]


texts = st.text(alphabet=ALPHABET, max_size=12).map(lambda s: s.replace("¶", "\r\n"))


def valid_edit(data: st.DataObject, ref: Reference) -> tuple[ContentChange, str]:
    """A change drawn from the reference's valid positions, and the text it produces."""
    new_text = data.draw(texts)
    if data.draw(st.integers(0, 9)) == 0:
        return TextDocumentContentChangeWholeDocument(text=new_text), new_text
    positions = ref.valid_positions()
    first, second = data.draw(st.sampled_from(positions)), data.draw(st.sampled_from(positions))
    start, end = sorted([first, second], key=lambda p: (p.line, p.character))
    a, b = ref.offset(start), ref.offset(end)
    assert a is not None and b is not None
    change = TextDocumentContentChangePartial(range=Range(start=start, end=end), text=new_text)
    return change, ref.text[:a] + new_text + ref.text[b:]


def invalid_position(data: st.DataObject, ref: Reference) -> Position:
    lines = ref.lines()
    kinds = ["past_last_line", "past_line_end"]
    inside = [
        pos(line, boundaries[i] + extra)
        for line in range(len(lines))
        for boundaries in [ref.boundaries(line)]
        for i in range(len(boundaries) - 1)
        for extra in range(1, boundaries[i + 1] - boundaries[i])
    ]
    if inside:
        kinds.append("inside_character")
    kind = data.draw(st.sampled_from(kinds))
    if kind == "past_last_line":
        return pos(len(lines) + data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)))
    if kind == "past_line_end":
        line = data.draw(st.integers(0, len(lines) - 1))
        return pos(line, ref.boundaries(line)[-1] + data.draw(st.integers(1, 3)))
    return data.draw(st.sampled_from(inside))


def invalid_edit(data: st.DataObject, ref: Reference) -> ContentChange:
    positions = ref.valid_positions()
    p, q = data.draw(st.sampled_from(positions)), data.draw(st.sampled_from(positions))
    if ref.offset(p) != ref.offset(q) and data.draw(st.booleans()):
        start, end = sorted([p, q], key=lambda x: (x.line, x.character), reverse=True)
    else:
        start, end = invalid_position(data, ref), data.draw(st.sampled_from(positions))
        if data.draw(st.booleans()):
            start, end = end, start
    return TextDocumentContentChangePartial(range=Range(start=start, end=end), text="!")


def check_matches(document: Document, ref: Reference) -> None:
    assert document.text == ref.text
    lines = ref.lines()
    assert document.line_count == len(lines)
    assert [document.line_text(n) for n in range(len(lines))] == lines
    for (line, character), expected in ref.offsets().items():
        position = pos(line, character)
        offset = document.offset_at(position, ref.encoding)
        assert offset == expected
        assert document.position_at(offset, ref.encoding) == position
    for offset in range(len(ref.text) + 1):
        if ref.text[offset - 1 : offset + 1] == "\r\n":
            continue  # between "\r" and "\n": no position addresses it
        position = document.position_at(offset, ref.encoding)
        assert document.offset_at(position, ref.encoding) == offset


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_edit_sequences_match_the_reference(encoding: str, data: st.DataObject) -> None:
    ref = Reference(data.draw(texts), encoding)
    store = DocumentStore()
    version = data.draw(st.integers(0, 5))
    store.open(URI, "python", version, ref.text)
    check_matches(store.get(URI), ref)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["valid", "valid", "invalid_change", "stale_version"]))
        before = store.get(URI)
        # Changes of one notification apply in order, each to the text the previous one left.
        scratch = Reference(ref.text, encoding)
        changes: list[ContentChange] = []
        bad_index = data.draw(st.integers(0, 2)) if kind == "invalid_change" else -1
        count = bad_index + 1 if kind == "invalid_change" else data.draw(st.integers(1, 3))
        for index in range(count):
            if index == bad_index:
                changes.append(invalid_edit(data, scratch))
            else:
                change, scratch.text = valid_edit(data, scratch)
                changes.append(change)
        if kind == "valid":
            version += data.draw(st.integers(1, 3))
            store.change(URI, version, changes, encoding)
            ref.text = scratch.text
        elif kind == "invalid_change":
            with pytest.raises(ChangeError, match=rf"change {bad_index + 1} of") as error:
                store.change(URI, version + 1, changes, encoding)
            assert error.value.index == bad_index
        else:
            stale = version - data.draw(st.integers(0, 3))
            with pytest.raises(VersionError):
                store.change(URI, stale, changes, encoding)
        document = store.get(URI)
        assert document.version == version
        if kind != "valid":
            assert document is before
        check_matches(document, ref)
