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

How long a draft is (`DraftPolicy`): a pass of T positions costs more than a step (the weights
stream once, but each position's arithmetic and attention are its own: on a Zen 4, bfloat16
with T = 3 cost 1.18x a step, int4 on AVX2's loops 2.13x), and a drafted token is worth a
step only if the model agrees with it. The policy measures both as requests run, per decode
step, and drafts only as long as the expected tokens per unit of cost beat a plain step.
"""

from __future__ import annotations

import weakref
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
        self.matched = 0  # how many tokens the last draft's match was (1 to MAX_NGRAM)

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
                self.matched = n
                return found
        self.matched = 0
        return []


# How fast the measurements move: a pass's cost, and the chance that a drafted token is taken.
COST_WEIGHT = 0.25
ACCEPT_WEIGHT = 0.1
# Every this many decisions, one token longer than the best known: lengths judged by an early
# or noisy measurement are measured again.
EXPLORE_EVERY = 16


class DraftPolicy:
    """How many tokens a draft should have to pay, on one decode step (`policy_for`), learnt as
    requests run: what a pass of T positions costs against a one-token step (a draft of T - 1
    tokens; measured: it depends on the CPU's loops, the weights' precision, the context), and
    the chance `accept` that a drafted token is the model's own (drafts are taken up to the
    first wrong token, so k drafted tokens yield 1 + p + ... + p^k tokens on average). The
    length chosen has the most tokens per unit of cost; 0 (a plain step) where none beats one
    token a step. The chance is kept apart for each length of the match the draft came from
    (three tokens seen before predict better than one). A length not measured yet is assumed
    cheap (each gets tried); the first measurement of each is dropped (buffers grow, caches
    warm up). `learn=False` keeps the given costs and chances (tests, and benchmarks that
    compare fixed policies)."""

    def __init__(self, costs: dict[int, float] | None = None, accept: float = 0.5,
                 learn: bool = True) -> None:
        self.costs = dict(costs or {})  # positions in a pass -> seconds (moving average)
        # the match's length -> the chance a drafted token is taken (moving average)
        self.accept = dict.fromkeys(range(1, MAX_NGRAM + 1), accept)
        self.learn = learn
        self._warm = set(self.costs)
        self._decisions = 0

    def ratio(self, rows: int) -> float:
        """A pass of `rows` positions against a one-token step."""
        one, cost = self.costs.get(1), self.costs.get(rows)
        if one is None or cost is None:
            return 1.0 + 0.1 * (rows - 1)
        return cost / one

    def length(self, room: int, matched: int) -> int:
        """Draft tokens for the next pass, at most `room`, from a match of `matched` tokens;
        0: a plain step."""
        best, best_rate, expected, chance = 0, 1.0, 1.0, 1.0
        accept = self.accept[matched]
        for k in range(1, room + 1):
            chance *= accept
            expected += chance
            rate = expected / self.ratio(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        if self.learn:
            self._decisions += 1
            if self._decisions % EXPLORE_EVERY == 0:
                return min(best + 1, room)
        return best

    def measured(self, rows: int, seconds: float) -> None:
        """A pass of `rows` positions took `seconds`."""
        if not self.learn:
            return
        if rows not in self._warm:
            self._warm.add(rows)
            return
        old = self.costs.get(rows)
        self.costs[rows] = seconds if old is None else old + COST_WEIGHT * (seconds - old)

    def checked(self, matched: int, drafted: int, agreed: int) -> None:
        """The model agreed with the first `agreed` of `drafted` tokens of a draft from a match
        of `matched` tokens (the rest were not judged: a draft stops at its first wrong
        token)."""
        if not self.learn:
            return
        accept = self.accept[matched]
        for _ in range(agreed):
            accept += ACCEPT_WEIGHT * (1.0 - accept)
        if agreed < drafted:
            accept -= ACCEPT_WEIGHT * accept
        self.accept[matched] = accept


# One policy per decode step object (a model's `decoder`), shared by every request it runs.
POLICIES: weakref.WeakKeyDictionary[object, DraftPolicy] = weakref.WeakKeyDictionary()


def policy_for(step: object) -> DraftPolicy:
    policy = POLICIES.get(step)
    if policy is None:
        policy = POLICIES[step] = DraftPolicy()
    return policy
