"""FIM prompts: mistral-common's encoding of two line-aligned windows, stable while typing."""

from __future__ import annotations

import inspect
import json

import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import engine
from engine.checkpoints.tiny import tokenizer_source
from lsp_server.documents import Document
from lsp_server.prompt import FimWindows, PromptBuilder
from lsp_server.tokenizer import PromptTokenizer

SOURCE = inspect.getsource(json.decoder)  # ~350 lines of real Python


@pytest.fixture(scope="module")
def tokenizer() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tokenizer_source("v3")))


def count(tokenizer: MistralTokenizer, text: str) -> int:
    return len(tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False))


def builder_for(tokenizer: MistralTokenizer, **budgets: int) -> PromptBuilder:
    return PromptBuilder(PromptTokenizer(tokenizer).count, **budgets)


def fim(tokenizer: MistralTokenizer, windows: FimWindows) -> list[int]:
    return PromptTokenizer(tokenizer).encode_fim(windows.prefix, windows.suffix)


def test_small_document_is_whole_and_encoded_by_mistral_common(
        tokenizer: MistralTokenizer) -> None:
    doc = Document("file:///a.py", "python", 1, "def f(x):\n    return x\n\nprint(f(2))\n")
    cursor = doc.text.index("x\n") + 1
    prompt = builder_for(tokenizer, prefix_tokens=100, suffix_tokens=100).build(doc, cursor)
    assert (prompt.prefix, prompt.suffix) == ("def f(x):\n    return x", "\n\nprint(f(2))\n")
    tokens = fim(tokenizer, prompt)
    assert tokens == tokenizer.encode_fim(
        FIMRequest(prompt=prompt.prefix, suffix=prompt.suffix)).tokens
    assert tokens[:2] == [1, 13]  # [BOS] [SUFFIX]


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
    moved = 0
    for i, char in enumerate(typed, start=1):
        text = text[:cursor] + char + text[cursor:]
        cursor += 1
        prompt = builder.build(Document(doc.uri, "python", i + 1, text), cursor)
        assert prompt.suffix == previous.suffix
        if prompt.prefix_start != previous.prefix_start:
            moved += 1
            assert doc.line_starts.index(previous.prefix_start) % 32 == 0
        else:
            before, after = fim(tokenizer, previous), fim(tokenizer, prompt)
            shared = 0
            while shared < len(before) and after[shared] == before[shared]:
                shared += 1
            assert len(before) - shared <= 2
        previous = prompt
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
        fim(v2, windows)
