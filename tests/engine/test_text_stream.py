"""Streaming text is UTF-8-safe: characters split over byte tokens are never emitted half."""

from __future__ import annotations

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine.checkpoints.tiny import tokenizer_source
from engine.checkpoints.tokenizer import TextStream

TEXT = "def naïve(x):\n    return '𝔘ŋ🎉 世界'  # ok\n"


@pytest.fixture(scope="module", params=["v1", "v3", "v7", "tekken"])
def tokenizer(request: pytest.FixtureRequest) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tokenizer_source(request.param)))


def test_deltas_concatenate_to_the_text_and_never_hold_a_broken_character(
        tokenizer: MistralTokenizer) -> None:
    raw = tokenizer.instruct_tokenizer.tokenizer
    ids = raw.encode(TEXT, bos=False, eos=False)
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    text = "".join(deltas) + stream.flush()
    # SentencePiece adds a dummy space before the first word; Tekken does not.
    assert text.lstrip(" ") == TEXT
    # The astral characters really were split over several tokens for this test to mean
    # something: some token completes no character.
    assert "" in deltas


def test_the_leading_space_of_a_continuation_is_kept() -> None:
    tokenizer = MistralTokenizer.from_file(str(tokenizer_source("v3")))
    raw = tokenizer.instruct_tokenizer.tokenizer
    prompt = raw.encode("x =", bos=False, eos=False)
    full = raw.encode("x = value", bos=False, eos=False)
    assert full[: len(prompt)] == prompt
    stream = TextStream(tokenizer)
    assert "".join(stream.push(i) for i in full[len(prompt):]) == " value"


def test_control_tokens_add_no_text() -> None:
    tokenizer = MistralTokenizer.from_file(str(tokenizer_source("tekken")))
    stream = TextStream(tokenizer)
    raw = tokenizer.instruct_tokenizer.tokenizer
    assert stream.push(raw.bos_id) == "" and stream.push(raw.eos_id) == ""


def test_an_incomplete_character_at_the_end_is_flushed_as_replacement() -> None:
    tokenizer = MistralTokenizer.from_file(str(tokenizer_source("v3")))
    raw = tokenizer.instruct_tokenizer.tokenizer
    ids = raw.encode("🎉", bos=False, eos=False)
    sp = raw._model
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "𝔘".encode()]
    stream = TextStream(tokenizer)
    assert [stream.push(i) for i in byte_ids[:2]] == ["", ""]
    assert stream.flush() == "\ufffd"
    assert ids  # the v3 vocabulary has 🎉 as one piece
