"""Document + cursor -> the two text windows of a fill-in-the-middle prompt. Pure: no I/O, no
server state, no tokenizer object (only a token counter).

The caller encodes the windows with mistral-common (`engine.encode_fim(tokenizer, prefix,
suffix)` gives `[BOS] [SUFFIX] suffix [PREFIX] prefix`). The windows:

- the suffix window runs from the cursor to the end of the last whole line that fits the suffix
  budget;
- the prefix window runs from a line start to the cursor. That start line is snapped to a grid
  of `anchor_lines` lines, the earliest grid line whose window fits the prefix budget. While the
  user types, the start stays put (the prompt only grows at its end, so the engine's prefix cache
  reuses everything before the cursor); when the prefix outgrows the budget the start jumps a
  whole grid step forward, which frees a large share of the budget at once instead of moving on
  every keystroke;
- a line too long for its budget (a minified bundle) is cut inside, at a character.

Since the suffix comes first in the token order, typing (which changes only the end of the
prefix) leaves all but the last few tokens of the prompt unchanged.

Cost, and its trade-off: counts are exact (the caller's tokenizer), but no text farther than
`budget * 8` characters from the cursor is ever tokenized, on either side. A window is
therefore never wider than that, even when its budget would allow more (only text averaging
over 8 characters per token, such as long runs of spaces, is cut short of its budget). Each
piece is tokenized once per build (counts are memoised); the binary searches run over line
starts, then over character offsets, always within that bound. `cancelled` is checked before
each count. Measured at the end of a 50 MB single line (v3 tokenizer, budgets 1536/512, the
document of `tests/lsp_server/test_prompt.py::test_a_50_mb_line_is_cut_by_characters_first`):
85 s before this bound (46 s for a like line of the same words, unrepeated, on a quieter
machine: a binary search over the whole line, ~26 counts, 50 MB tokenized in all); 0.02 s
after (14 counts, 57 000 characters).

Lone surrogates (a JSON `\\ud800` escape the client sent): the document keeps them (positions
count them); the windows replace each with U+FFFD, one code point for one, so no offset moves,
and tokenizers, which cannot encode them, never see one.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .documents import Document

# A generous bound on characters per token: windows are cut to `budget * 8` characters before
# anything is tokenized.
MAX_CHARS_PER_TOKEN = 8

_SURROGATE = re.compile("[\ud800-\udfff]")


class PromptCancelled(Exception):
    """`build`'s `cancelled()` said so while the windows were being measured."""


@dataclass(frozen=True)
class FimWindows:
    prefix: str  # the window before the cursor
    suffix: str  # the window after the cursor
    prefix_start: int  # document offsets of the windows
    suffix_end: int


def prompt_text(text: str) -> str:
    """`text` as a tokenizer can take it: each lone surrogate becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


class PromptBuilder:
    def __init__(self, count_tokens: Callable[[str], int], *, prefix_tokens: int,
                 suffix_tokens: int, anchor_lines: int = 64) -> None:
        if prefix_tokens < 1 or suffix_tokens < 0 or anchor_lines < 1:
            raise ValueError("prefix_tokens >= 1, suffix_tokens >= 0 and anchor_lines >= 1")
        self._count_tokens = count_tokens
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.anchor_lines = anchor_lines

    def build(self, document: Document, cursor: int,
              cancelled: Callable[[], bool] | None = None) -> FimWindows:
        """The windows for `cursor`, an offset into the document's text. Raises
        `PromptCancelled` as soon as `cancelled()` is true between two counts."""
        text, starts = document.text, document.line_starts
        if not 0 <= cursor <= len(text):
            raise ValueError(f"cursor {cursor} outside the document (0..{len(text)})")
        measure = _Measure(text, self._count_tokens, cancelled)
        line = bisect.bisect_right(starts, cursor) - 1
        prefix_start = self._prefix_start(measure, cursor, starts, line)
        suffix_end = self._suffix_end(measure, cursor, starts, line)
        return FimWindows(prompt_text(text[prefix_start:cursor]),
                          prompt_text(text[cursor:suffix_end]), prefix_start, suffix_end)

    def _prefix_start(self, measure: _Measure, cursor: int, starts: Sequence[int],
                      line: int) -> int:
        """The earliest line start on the coarsest grid whose window fits the budget.

        Grids of `anchor_lines`, then half that, ... then every line: a coarse grid keeps the
        start still for longer, a finer one serves budgets smaller than a grid step.
        """
        budget = self.prefix_tokens
        bound = max(0, cursor - budget * MAX_CHARS_PER_TOKEN)
        earliest = bisect.bisect_left(starts, bound)
        step = self.anchor_lines
        while step >= 1:
            first = -(-earliest // step) * step  # the first grid line within the bound
            candidates = range(first, line + 1, step)
            # Later starts give fewer tokens: binary search for the earliest that fits.
            lo, hi = 0, len(candidates)
            while lo < hi:
                mid = (lo + hi) // 2
                if measure(starts[candidates[mid]], cursor) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            if lo < len(candidates):
                return starts[candidates[lo]]
            step //= 2
        # Not even the cursor line fits (a very long line): cut inside it, within the bound.
        left, right = max(starts[line], bound), cursor
        while left < right:  # the smallest start whose text up to the cursor fits
            mid = (left + right) // 2
            if measure(mid, cursor) <= budget:
                right = mid
            else:
                left = mid + 1
        return left

    def _suffix_end(self, measure: _Measure, cursor: int, starts: Sequence[int],
                    line: int) -> int:
        budget = self.suffix_tokens
        if budget == 0:
            return cursor
        bound = min(len(measure.text), cursor + budget * MAX_CHARS_PER_TOKEN)
        # Line ends after the cursor, within the bound: the end of the cursor line, then of
        # each following line.
        ends = list(starts[line + 1:bisect.bisect_right(starts, bound)])
        if len(measure.text) <= bound and (not ends or ends[-1] < len(measure.text)):
            ends.append(len(measure.text))
        if not ends or measure(cursor, ends[0]) > budget:
            # Even the rest of the cursor line is too long: keep what fits of it.
            left, right = cursor, ends[0] if ends else bound
            while left < right:
                mid = (left + right + 1) // 2
                if measure(cursor, mid) <= budget:
                    left = mid
                else:
                    right = mid - 1
            return left
        lo, hi = 0, len(ends) - 1
        while lo < hi:  # the last line end that fits
            mid = (lo + hi + 1) // 2
            if measure(cursor, ends[mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return ends[lo]


class _Measure:
    """Token counts of `text[start:end]`, each computed once, cancellable between counts."""

    def __init__(self, text: str, count_tokens: Callable[[str], int],
                 cancelled: Callable[[], bool] | None) -> None:
        self.text = text
        self._count_tokens = count_tokens
        self._cancelled = cancelled
        self._counts: dict[tuple[int, int], int] = {}

    def __call__(self, start: int, end: int) -> int:
        if start >= end:
            return 0
        if (count := self._counts.get((start, end))) is None:
            if self._cancelled is not None and self._cancelled():
                raise PromptCancelled
            count = self._count_tokens(prompt_text(self.text[start:end]))
            self._counts[start, end] = count
        return count
