"""FIM prompts: mistral-common's encoding of two line-aligned windows, stable while typing,
cut by characters before anything is tokenized."""

from __future__ import annotations

import inspect
import json
import random
import time

import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine
from engine.checkpoints.tiny import tokenizer_source
from lsp_server.documents import Document
from lsp_server.prompt import FimWindows, PromptBuilder, PromptCancelled

SOURCE = inspect.getsource(json.decoder)  # ~350 lines of real Python


@pytest.fixture(scope="module")
def tokenizer() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tokenizer_source("v3")))


def count(tokenizer: MistralTokenizer, text: str) -> int:
    return len(tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False))


def builder_for(tokenizer: MistralTokenizer, **budgets: int) -> PromptBuilder:
    return PromptBuilder(lambda text: count(tokenizer, text), **budgets)


def tokens(tokenizer: MistralTokenizer, windows: FimWindows) -> list[int]:
    return engine.encode_fim(tokenizer, windows.prefix, windows.suffix)


def test_small_document_is_whole_and_encoded_by_mistral_common(
        tokenizer: MistralTokenizer) -> None:
    doc = Document("file:///a.py", "python", 1, "def f(x):\n    return x\n\nprint(f(2))\n")
    cursor = doc.text.index("x\n") + 1
    prompt = builder_for(tokenizer, prefix_tokens=100, suffix_tokens=100).build(doc, cursor)
    assert prompt == FimWindows("def f(x):\n    return x", "\n\nprint(f(2))\n", 0, len(doc.text))
    assert tokens(tokenizer, prompt) == tokenizer.encode_fim(
        FIMRequest(prompt=prompt.prefix, suffix=prompt.suffix)).tokens
    assert tokens(tokenizer, prompt)[:2] == [1, 13]  # [BOS] [SUFFIX]


def test_windows_are_line_aligned_and_within_budget(tokenizer: MistralTokenizer) -> None:
    doc = Document("file:///d.py", "python", 1, SOURCE)
    builder = builder_for(tokenizer, prefix_tokens=300, suffix_tokens=120, anchor_lines=16)
    for line in (40, 150, 200, 300):
        start, end = doc.line_span(line)
        cursor = start + (end - start) // 2
        prompt = builder.build(doc, cursor)
        assert prompt.prefix_start in doc.line_starts
        assert prompt.suffix_end == len(doc.text) or doc.text[prompt.suffix_end - 1] == "\n"
        assert count(tokenizer, prompt.prefix) <= 300
        assert count(tokenizer, prompt.suffix) <= 120
        # the windows are as large as the budget allows: one more line would not fit
        start_line = doc.line_starts.index(prompt.prefix_start)
        assert start_line % 16 == 0
        assert count(tokenizer, doc.text[doc.line_starts[start_line - 16]:cursor]) > 300
        next_end = doc.text.index("\n", prompt.suffix_end) + 1
        assert count(tokenizer, doc.text[cursor:next_end]) > 120


def test_typing_keeps_the_start_of_the_prompt(tokenizer: MistralTokenizer) -> None:
    """Consecutive prompts while typing share all but their last few tokens."""
    doc = Document("file:///d.py", "python", 1, SOURCE)
    builder = builder_for(tokenizer, prefix_tokens=400, suffix_tokens=150, anchor_lines=32)
    cursor = doc.line_span(180)[1]
    typed = "\n    def decode_all(self, s):\n        return [self.decode(x) for x in s]"
    text = doc.text
    previous = builder.build(doc, cursor)
    previous_tokens = tokens(tokenizer, previous)
    moved = 0
    for i, char in enumerate(typed, start=1):
        text = text[:cursor] + char + text[cursor:]
        cursor += 1
        prompt = builder.build(Document(doc.uri, "python", i + 1, text), cursor)
        prompt_tokens = tokens(tokenizer, prompt)
        assert prompt.suffix == previous.suffix
        if prompt.prefix_start != previous.prefix_start:
            moved += 1
            assert doc.line_starts.index(previous.prefix_start) % 32 == 0
        else:
            shared = 0
            while shared < len(previous_tokens) and \
                    prompt_tokens[shared] == previous_tokens[shared]:
                shared += 1
            assert len(previous_tokens) - shared <= 2
        previous, previous_tokens = prompt, prompt_tokens
    assert moved <= 1


def test_the_prefix_window_moves_in_whole_grid_steps(tokenizer: MistralTokenizer) -> None:
    doc = Document("file:///d.py", "python", 1, SOURCE)
    builder = builder_for(tokenizer, prefix_tokens=800, suffix_tokens=50, anchor_lines=32)
    starts = set()
    for line in range(60, 200):
        prompt = builder.build(doc, doc.line_span(line)[1])
        starts.add(doc.line_starts.index(prompt.prefix_start))
    assert all(s % 32 == 0 for s in starts)
    # 140 lines of cursor movement, but only a handful of distinct windows
    assert len(starts) <= 140 // 32 + 2


def test_a_very_long_line_is_cut_inside(tokenizer: MistralTokenizer) -> None:
    text = "x = [" + ", ".join(str(i) for i in range(3000)) + "]\n"
    doc = Document("file:///l.py", "python", 1, text)
    cursor = len(text) // 2
    prompt = builder_for(tokenizer, prefix_tokens=64, suffix_tokens=32).build(doc, cursor)
    assert 60 <= count(tokenizer, prompt.prefix) <= 64
    assert 28 <= count(tokenizer, prompt.suffix) <= 32
    assert doc.text[prompt.prefix_start:cursor] == prompt.prefix


def test_tokenizers_without_fim_are_refused() -> None:
    v2 = MistralTokenizer.from_file(str(tokenizer_source("v2")))
    doc = Document("file:///a.py", "python", 1, "a = 1\n")
    windows = builder_for(v2, prefix_tokens=10, suffix_tokens=10).build(doc, 3)
    with pytest.raises(engine.GenerationError, match="has no fill-in-the-middle"):
        tokens(v2, windows)


def minified(size: int) -> str:
    """A single line of `size` characters that tokenizes like a minified bundle."""
    rng = random.Random(0)
    words = ["var", "function", "return", "a", "b", "c", "=", "(", ")", "{", "}", ";", ",",
             "0", "1", "x", "this", ".", "length", "if", "else"]
    parts, n = [], 0
    while n < 100_000:
        parts.append(rng.choice(words))
        n += len(parts[-1])
    block = "".join(parts)
    return (block * (size // len(block) + 1))[:size]


class Recorder:
    """A token counter that records the length of every text it was given."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text: str) -> int:
        self.lengths.append(len(text))
        return count(self.tokenizer, text)


@pytest.fixture(scope="module")
def bundle() -> Document:
    return Document("file:///bundle.min.js", "javascript", 1, minified(50_000_000))


@pytest.mark.parametrize("where", [1.0, 0.5])
def test_a_50_mb_line_is_cut_by_characters_first(tokenizer: MistralTokenizer, bundle: Document,
                                                  where: float) -> None:
    """Issue 9: 46 s to build this prompt (the line was tokenized ~25 times, megabytes each);
    now nothing farther than budget * 8 characters from the cursor is tokenized, each piece
    once, and the windows are still the largest that fit."""
    text, cursor = bundle.text, int(len(bundle.text) * where)
    recorder = Recorder(tokenizer)
    started = time.perf_counter()
    prompt = PromptBuilder(recorder, prefix_tokens=1536, suffix_tokens=512).build(bundle, cursor)
    print(f"50 MB line, cursor at {where:.0%}: {time.perf_counter() - started:.3f} s, "
          f"{len(recorder.lengths)} counts, {sum(recorder.lengths)} characters tokenized")
    assert max(recorder.lengths) <= 1536 * 8
    assert len(recorder.lengths) <= 2 * 15  # two binary searches over <= 1536 * 8 offsets
    prefix_tokens = count(tokenizer, prompt.prefix)
    assert prompt.prefix == text[prompt.prefix_start:cursor]
    assert 1530 <= prefix_tokens <= 1536  # cut inside the line, as full as the budget allows
    assert count(tokenizer, text[prompt.prefix_start - 1:cursor]) > 1536
    if cursor == len(text):
        assert (prompt.suffix, prompt.suffix_end) == ("", len(text))
    else:
        assert prompt.suffix == text[cursor:prompt.suffix_end]
        assert 506 <= count(tokenizer, prompt.suffix) <= 512
        assert count(tokenizer, text[cursor:prompt.suffix_end + 1]) > 512


def test_each_piece_is_tokenized_once(tokenizer: MistralTokenizer) -> None:
    """The grids share lines (every 32nd line is also a 16th): a count is never repeated."""
    doc = Document("file:///d.py", "python", 1, SOURCE)
    texts: list[str] = []

    def counting(text: str) -> int:
        texts.append(text)
        return count(tokenizer, text)

    # A budget smaller than a grid step makes the builder try several grids.
    PromptBuilder(counting, prefix_tokens=60, suffix_tokens=40, anchor_lines=64).build(
        doc, doc.line_span(200)[1])
    assert len(texts) == len(set(texts)) > 5


def test_a_cancelled_build_stops_between_two_counts(tokenizer: MistralTokenizer) -> None:
    doc = Document("file:///l.js", "javascript", 1, minified(1_000_000))
    recorder = Recorder(tokenizer)
    builder = PromptBuilder(recorder, prefix_tokens=1536, suffix_tokens=512)
    with pytest.raises(PromptCancelled):
        builder.build(doc, 500_000, cancelled=lambda: len(recorder.lengths) >= 3)
    assert len(recorder.lengths) == 3


def test_lone_surrogates_become_replacement_characters_in_the_prompt_only(
        tokenizer: MistralTokenizer) -> None:
    """A JSON "\\ud800" reaches us as a lone surrogate, which no tokenizer can encode: the
    windows carry U+FFFD instead, at the same offsets; the document keeps what was sent."""
    text = 'name = "a\ud800b"\nlow = "\udc00"\nprint(name)\n'
    doc = Document("file:///s.py", "python", 1, text)
    cursor = text.index("print")
    prompt = builder_for(tokenizer, prefix_tokens=100, suffix_tokens=100).build(doc, cursor)
    replaced = text.replace("\ud800", "\ufffd").replace("\udc00", "\ufffd")
    assert prompt == FimWindows(replaced[:cursor], replaced[cursor:], 0, len(text))
    assert doc.text == text  # the document is not changed
    assert tokens(tokenizer, prompt) == tokenizer.encode_fim(
        FIMRequest(prompt=replaced[:cursor], suffix=replaced[cursor:])).tokens
    with pytest.raises(RuntimeError, match="Unable to cast"):  # spared to the tokenizer
        count(tokenizer, text)
