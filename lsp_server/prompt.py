"""Document + cursor -> fill-in-the-middle prompt. Pure: no I/O, no server state.

The prompt is mistral-common's `encode_fim(FIMRequest(prompt=prefix, suffix=suffix))`, i.e.
`[BOS] [SUFFIX] suffix [PREFIX] prefix`, built from two windows of the document that this
module cuts (it needs only a token counter; the caller encodes):

- the suffix window runs from the cursor to the end of the last whole line that fits the suffix
  budget;
- the prefix window runs from a line start to the cursor. That start line is snapped to a grid
  of `anchor_lines` lines, the earliest grid line whose window fits the prefix budget. While the
  user types, the start stays put (the prompt only grows at its end, so the engine's prefix cache
  reuses everything before the cursor); when the prefix outgrows the budget the start jumps a
  whole grid step forward, which frees a large share of the budget at once instead of moving on
  every keystroke.

Since the suffix comes first in the token order, typing (which changes only the end of the
prefix) leaves all but the last few tokens of the prompt unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .documents import Document

# A generous characters-per-token bound used only to skip hopeless candidates cheaply; every
# window is then measured with the real tokenizer.
_MAX_CHARS_PER_TOKEN = 8


class PromptCancelled(Exception):
    """The request was cancelled while its prompt was being built."""


@dataclass(frozen=True)
class FimWindows:
    prefix: str  # the window before the cursor
    suffix: str  # the window after the cursor
    prefix_start: int  # document offsets of the windows
    suffix_end: int


class PromptBuilder:
    def __init__(self, count_tokens: Callable[[str], int], *, prefix_tokens: int,
                 suffix_tokens: int, anchor_lines: int = 64) -> None:
        if prefix_tokens < 1 or suffix_tokens < 0 or anchor_lines < 1:
            raise ValueError("prefix_tokens >= 1, suffix_tokens >= 0 and anchor_lines >= 1")
        self._count_tokens = count_tokens
        self._cancelled: Callable[[], bool] | None = None
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.anchor_lines = anchor_lines

    def _count(self, text: str) -> int:
        if self._cancelled is not None and self._cancelled():
            raise PromptCancelled
        return self._count_tokens(text)

    def build(self, document: Document, cursor: int,
              cancelled: Callable[[], bool] | None = None) -> FimWindows:
        """The FIM windows for `cursor`, an offset into the document's text; `cancelled` is
        checked while building (`PromptCancelled`)."""
        text, starts = document.text, document.line_starts
        if not 0 <= cursor <= len(text):
            raise ValueError(f"cursor {cursor} outside the document (0..{len(text)})")
        self._cancelled = cancelled
        line = bisect.bisect_right(starts, cursor) - 1
        prefix_start = self._prefix_start(text, cursor, starts, line)
        suffix_end = self._suffix_end(text, cursor, starts, line)
        prefix, suffix = text[prefix_start:cursor], text[cursor:suffix_end]
        return FimWindows(prefix, suffix, prefix_start, suffix_end)

    def _prefix_start(self, text: str, cursor: int, starts: Sequence[int], line: int) -> int:
        """The earliest line start on the coarsest grid whose window fits the budget.

        Grids of `anchor_lines`, then half that, ... then every line: a coarse grid keeps the
        start still for longer, a finer one serves budgets smaller than a grid step.
        """
        budget = self.prefix_tokens
        earliest = bisect.bisect_left(starts, cursor - budget * _MAX_CHARS_PER_TOKEN)
        step = self.anchor_lines
        while step >= 1:
            first = -(-earliest // step) * step  # the first grid line not hopelessly far
            candidates = range(first, line + 1, step)
            # Later starts give fewer tokens: binary search for the earliest that fits.
            lo, hi = 0, len(candidates)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._count(text[starts[candidates[mid]]:cursor]) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            if lo < len(candidates):
                return starts[candidates[lo]]
            step //= 2
        # Not even the cursor line fits (a very long line): cut inside it.
        return self._cut_left(text, starts[line], cursor, budget)

    def _cut_left(self, text: str, lo: int, hi: int, budget: int) -> int:
        """Smallest start in [lo, hi] whose text up to hi fits `budget` tokens."""
        left, right = lo, hi
        while left < right:
            mid = (left + right) // 2
            if self._count(text[mid:hi]) <= budget:
                right = mid
            else:
                left = mid + 1
        return left

    def _suffix_end(self, text: str, cursor: int, starts: Sequence[int], line: int) -> int:
        budget = self.suffix_tokens
        if budget == 0:
            return cursor
        # Line ends after the cursor: the end of the cursor line, then of each following line.
        ends = [*starts[line + 1:], len(text)]
        lo, hi = 0, len(ends) - 1
        limit = cursor + budget * _MAX_CHARS_PER_TOKEN
        hi = max(0, min(hi, bisect.bisect_right(ends, limit) - 1))
        if self._count(text[cursor:ends[0]]) > budget:
            # Even the rest of the cursor line is too long: keep what fits of it.
            return self._cut_right(text, cursor, ends[0], budget)
        while lo < hi:  # the last line end that fits
            mid = (lo + hi + 1) // 2
            if self._count(text[cursor:ends[mid]]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return ends[lo]

    def _cut_right(self, text: str, lo: int, hi: int, budget: int) -> int:
        left, right = lo, hi
        while left < right:
            mid = (left + right + 1) // 2
            if self._count(text[lo:mid]) <= budget:
                left = mid
            else:
                right = mid - 1
        return left
