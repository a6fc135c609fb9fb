"""Drafts for speculative decoding by lookup: the tokens that followed the same few tokens
earlier in the request (its prompt, what it generated so far) or in what this document's
earlier requests generated (`PrefixCache` keeps their outputs).

While a person types, consecutive completions of a document overlap: the ghost text of one
keystroke is, shifted, most of the next one's, and a completion often repeats what the code
around the cursor already says (the suffix of a FIM prompt, an earlier line). Where the last
`n` tokens (`n` from `MAX_NGRAM` down to 1) occurred before, the tokens that followed them
are the draft; the model checks a draft of k tokens in one pass (`phases.verify_greedy`: the
weights stream once for all k + 1 positions) and keeps the longest prefix it agrees with, plus
its own next token. Greedy decoding only, so the output is exactly the output without drafts:
what changes is how many passes over the weights it takes.

Search order, for the longest `n` first: what the request generated so far, then earlier
outputs (newest first: the last keystroke's completion is the best guess at this one's), then
the prompt (its most recent occurrence). Sequences are searched as bytes (`bytes.rfind`, four
bytes a token): a ~2k-token prompt costs microseconds a lookup, where indexing its n-grams in
a dictionary cost ~4 ms a request.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

MAX_NGRAM = 3


def _packed(tokens: Sequence[int]) -> bytes:
    return array("I", tokens).tobytes()


def _follow(seq: Sequence[int], packed: bytes, key: bytes, k: int) -> list[int]:
    """Up to k tokens after the latest occurrence of `key` in `seq` that has any."""
    end = len(packed) - 4  # an occurrence must leave a token after it
    while True:
        at = packed.rfind(key, 0, end)
        if at < 0:
            return []
        if at % 4 == 0:  # not straddling two tokens
            start = (at + len(key)) // 4
            return list(seq[start:start + k])
        end = at + len(key) - 1


class Drafter:
    """Drafts for one request: `prompt`, and `history` (earlier outputs, oldest first)."""

    def __init__(self, prompt: Sequence[int], history: Sequence[Sequence[int]] = ()) -> None:
        self.prompt = list(prompt)
        self.history = [list(h) for h in reversed(history) if h]  # newest first
        self._packed: list[bytes] | None = None

    def draft(self, generated: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `prompt + generated`; [] when nothing matches."""
        if k <= 0 or not generated:
            return []
        if self._packed is None:
            self._packed = [_packed(s) for s in (*self.history, self.prompt)]
        own = _packed(generated)
        tail = [*self.prompt[-MAX_NGRAM:], *generated][-MAX_NGRAM:]
        for n in range(len(tail), 0, -1):
            key = _packed(tail[-n:])
            found = _follow(generated, own, key, k) if n <= len(generated) else []
            for seq, packed in zip((*self.history, self.prompt), self._packed, strict=True):
                if found:
                    break
                found = _follow(seq, packed, key, k)
            if found:
                return found
        return []
