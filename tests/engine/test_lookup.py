"""Speculative decoding by lookup (`engine.runtime.lookup`, `Generation`'s drafts, the native
step's `verify`): which drafts are found, and that the tokens and log-probabilities are exactly
those of decoding without drafts, whether the drafts are taken or rejected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import engine
from engine.arch import kernels
from engine.arch.cache import Cache
from engine.runtime import native
from engine.runtime.generation import Generation
from engine.runtime.lookup import (
    EXPLORE_EVERY,
    MAX_NGRAM,
    POLICIES,
    Drafter,
    DraftPolicy,
    policy_for,
)
from engine.runtime.prefix_cache import HISTORY_OUTPUTS
from tests.conftest import CheckpointFactory

SHAPE = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, n_layers=2)
PROMPT = [1, *range(300, 330)]
MAX_SEQ_LEN = 96

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="the C++ kernels are not built here")


# -- drafts ------------------------------------------------------------------------------------

def test_the_longest_match_is_drafted_from_the_newest_source_first() -> None:
    drafter = Drafter(prompt=[1, 2, 3, 4, 2, 3, 9, 9], history=[[7, 8, 1, 5], [2, 3, 6]])
    # [2, 3]: the newest earlier output ([2, 3, 6]) before the prompt's 2, 3 -> 4
    assert drafter.draft([2, 3], 3) == [6]
    # [8]: only the older output has it
    assert drafter.draft([8], 2) == [1, 5]
    # the tokens generated so far come first: 4 was followed by 4 in them
    assert drafter.draft([4, 4], 2) == [4]
    # three tokens beat two: the prompt's 1, 2, 3 -> 4, 2 over the output's 2, 3 -> 6
    assert Drafter(prompt=[1, 2, 3, 4, 2, 0], history=[[2, 3, 6]]).draft([1, 2, 3], 2) == [4, 2]
    # the n-gram may straddle the prompt's end and the first generated token
    assert Drafter(prompt=[5, 6, 7, 5, 6]).draft([7], 4) == [5, 6]
    # the most recent occurrence in a sequence wins; k bounds the draft
    assert Drafter(prompt=[4, 1, 4, 2, 3, 0]).draft([4], 1) == [2]
    assert Drafter(prompt=[4, 1, 4, 2, 3, 0]).draft([4], 5) == [2, 3, 0]


def test_no_draft_without_a_match_tokens_or_room() -> None:
    drafter = Drafter(prompt=[1, 2, 3], history=[[4, 5]])
    assert drafter.draft([9], 4) == []
    assert drafter.draft([], 4) == []
    assert drafter.draft([2], 0) == []
    # an occurrence at a sequence's very end has nothing after it
    assert Drafter(prompt=[1, 2, 3]).draft([3], 4) == []


def test_a_byte_match_across_two_tokens_is_not_a_match() -> None:
    # tokens are searched as 4 little-endian bytes each: 0x10000, 0 is 00 00 01 00 00 00 00 00,
    # which holds 1 (01 00 00 00) at byte 2, inside no token
    assert Drafter(prompt=[0x10000, 0, 5]).draft([1], 2) == []
    assert Drafter(prompt=[0x10000, 0, 1, 6]).draft([1], 2) == [6]


# -- the generation loop -----------------------------------------------------------------------

class Scripted(Drafter):
    """Drafts read from the answer itself: `take` right tokens, then one wrong one."""

    def __init__(self, answer: Sequence[int], take: int, vocab: int) -> None:
        super().__init__([])
        self.answer, self.take, self.vocab = list(answer), take, vocab
        self.calls = 0
        self.matched = MAX_NGRAM

    def draft(self, generated: Sequence[int], k: int) -> list[int]:
        self.calls += 1
        right = self.answer[len(generated):len(generated) + min(self.take, k)]
        if len(right) < k:
            wrong = (self.answer[len(generated) + len(right)] + 1) % self.vocab \
                if len(generated) + len(right) < len(self.answer) else 0
            return [*right, wrong]
        return right


def drafts_always_pay(step: object) -> None:
    """Every pass costs a step, and drafts are likely right: the longest draft, every time
    (the passes a test counts do not depend on this machine's timings)."""
    POLICIES[step] = DraftPolicy(costs=dict.fromkeys(range(1, 33), 1.0), accept=0.9,
                                 learn=False)


def reference(model: engine.Model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    events = list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=n), eos_id=-1))
    return ([e.token for e in events if isinstance(e, engine.TokenEvent)],
            [e.logprob for e in events if isinstance(e, engine.TokenEvent)])


def run(model: engine.Model, prompt: list[int], n: int, drafter: Drafter, lookup: int,
        cache: Cache) -> tuple[list[int], list[float], Generation]:
    tokens: list[int] = []
    logprobs: list[float] = []
    with torch.inference_mode():
        gen = Generation(model, [prompt], engine.SamplingParams(max_tokens=n), eos_id=-1,
                         cache=cache, drafter=drafter, lookup=lookup)
        while not gen.done:
            decoded = gen.advance()
            if decoded is not None:
                tokens.append(decoded.tokens[0])
                logprobs.append(decoded.logprobs[0])
    return tokens, logprobs, gen


@needs_kernels
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("take", [0, 1, 3])
@pytest.mark.parametrize("window", [None, [8, None]], ids=["full", "window8-and-full"])
def test_drafts_taken_or_rejected_leave_the_tokens_and_logprobs_exact(
        make_checkpoint: CheckpointFactory, quantize: str | None, take: int,
        window: list[int | None] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each draft: `take` right tokens and a wrong one. 40 tokens (the window of 8 wraps many
    times; its rotating buffer has 5 spare slots, which bound a pass to 6 tokens): the native
    step's answer without drafts, bit for bit, and the cache cut back to what was accepted."""
    model = engine.load(make_checkpoint("native", sliding_window=window, **SHAPE),
                        quantize=quantize)
    decoder = engine.enable_fast_decode(model, MAX_SEQ_LEN, rewind=5)
    assert decoder.chunk_tokens == (6 if window else kernels.MAX_ROWS)
    drafts_always_pay(decoder)
    try:
        want, want_lp = reference(model, PROMPT, 40)
        passes: list[int] = []
        verify = native.NativeStep.verify

        def counting(self: native.NativeStep, tokens: torch.Tensor,
                     *args: object) -> tuple[list[int], list[float]]:
            passes.append(tokens.shape[1])
            return verify(self, tokens, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(native.NativeStep, "verify", counting)
        drafter = Scripted(want, take, model.config.vocab_size)
        cache = decoder.new_cache()
        got, got_lp, gen = run(model, PROMPT, 40, drafter, 6, cache)
    finally:
        model.decoder = None
    assert got == want
    assert got_lp == want_lp
    assert gen.stats.accepted == sum(min(take, t - 1) for t in passes)
    assert gen.stats.drafted == sum(passes) - len(passes)
    # every pass: the last token, then the draft (at most 5 after it: the window's spare slots)
    assert passes and max(passes) <= 6
    held = len(PROMPT) + 39
    assert gen.stats.cached == [held]
    for slot_pos in cache.slot_pos:  # type: ignore[attr-defined]
        assert int(slot_pos.max()) == held - 1  # nothing of a rejected draft is left


@needs_kernels
def test_a_repeated_request_takes_its_last_output_as_drafts(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a prefix cache: the same prompt again drafts from the last output and every
    draft is taken: after the prefill's token, 3 passes instead of 11 steps (drafts of 4, 4,
    then a plain step: the last token has no room for a draft);
    a changed prompt drafts from both earlier outputs; the answers are, bit for bit, those of
    the same requests through a prefix cache without drafts."""
    model = engine.load(make_checkpoint("native", **SHAPE))
    grown = [*PROMPT, 11, 12]
    drafts_always_pay(engine.enable_fast_decode(model, MAX_SEQ_LEN, rewind=8))
    passes: list[int] = []
    verify, greedy = native.NativeStep.verify, native.NativeStep.greedy

    def counting(self: native.NativeStep, tokens: torch.Tensor,
                 *args: object) -> tuple[list[int], list[float]]:
        passes.append(tokens.shape[1])
        return verify(self, tokens, *args)  # type: ignore[arg-type]

    def counting_greedy(self: native.NativeStep, tokens: torch.Tensor,
                        *args: object) -> tuple[list[int], list[float]]:
        passes.append(1)
        return greedy(self, tokens, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(native.NativeStep, "verify", counting)
    monkeypatch.setattr(native.NativeStep, "greedy", counting_greedy)

    def session(lookup: int) -> tuple[list[Any], list[Any], engine.PrefixCache]:
        cache = engine.PrefixCache(model, max_seq_len=MAX_SEQ_LEN, budget_bytes=2**26,
                                   rewind=8)
        streams, counts = [], []
        for prompt in (PROMPT, PROMPT, grown):
            passes.clear()
            stream = engine.stream(prompt, model, engine.SamplingParams(max_tokens=12),
                                   eos_id=-1, prefix_cache=cache, cache_key="doc",
                                   lookup=lookup)
            events = list(stream)
            streams.append(([e.token for e in events if isinstance(e, engine.TokenEvent)],
                            [e.logprob for e in events if isinstance(e, engine.TokenEvent)]))
            end = events[-1]
            assert isinstance(end, engine.EndEvent)
            counts.append((list(passes), end.drafted_tokens, end.accepted_tokens))
        return streams, counts, cache

    try:
        want, plain, _ = session(0)
        got, counts, cache = session(4)
    finally:
        model.decoder = None
    assert got == want
    assert [c[0] for c in plain] == [[1] * 11] * 3  # the first token comes from the prefill
    assert [c[1:] for c in plain] == [(0, 0)] * 3
    repeat_passes, drafted, accepted = counts[1]
    assert repeat_passes == [5, 5, 1] and drafted == accepted == 8
    lease = cache.checkout("doc", grown)
    assert lease is not None
    assert lease.history == [want[0][0], want[1][0], want[2][0]]


@needs_kernels
@pytest.mark.parametrize("window", [None, [8, None]], ids=["full", "window8-and-full"])
def test_a_stream_stopped_with_drafted_tokens_pending_leaves_a_cache_that_is_right(
        make_checkpoint: CheckpointFactory, window: list[int | None] | None) -> None:
    """The server stops a completion where its text is complete, often right after a pass
    that took several drafted tokens: the cache then holds keys of tokens never emitted. The
    next requests of the document (the same prompt, then a grown one) still answer, bit for
    bit, as a cache that never saw a draft."""
    model = engine.load(make_checkpoint("native", sliding_window=window, **SHAPE))
    drafts_always_pay(engine.enable_fast_decode(model, MAX_SEQ_LEN, rewind=8))
    grown = [*PROMPT, 11, 12]

    def session(lookup: int) -> list[list[int]]:
        cache = engine.PrefixCache(model, max_seq_len=MAX_SEQ_LEN, budget_bytes=2**26,
                                   rewind=8)
        answers = []
        for prompt, stop_after in ((PROMPT, None), (PROMPT, 3), (PROMPT, None), (grown, None)):
            stream = engine.stream(prompt, model, engine.SamplingParams(max_tokens=12),
                                   eos_id=-1, prefix_cache=cache, cache_key="doc",
                                   lookup=lookup)
            tokens = []
            for event in stream:
                if isinstance(event, engine.TokenEvent):
                    tokens.append(event.token)
                    if len(tokens) == stop_after:
                        # with drafts: tokens taken and in the cache, not yet emitted
                        assert (stream._run.stats.cached[0] > len(prompt) + len(tokens)) == \
                            bool(lookup)
                        stream.close()
            answers.append(tokens)
        return answers

    try:
        want = session(0)
        got = session(8)
    finally:
        model.decoder = None
    assert got == want
    assert len(got[1]) == 3 and got[2] == got[0]


def test_history_keeps_the_newest_outputs(make_checkpoint: CheckpointFactory) -> None:
    model = engine.load(make_checkpoint("native", **SHAPE))
    cache = engine.PrefixCache(model, max_seq_len=MAX_SEQ_LEN, budget_bytes=2**26)
    for i in range(HISTORY_OUTPUTS + 3):
        lease = cache.checkout("doc", PROMPT)
        assert lease is not None
        cache.checkin(lease, PROMPT, [i, i + 1])
    lease = cache.checkout("doc", PROMPT)
    assert lease is not None
    assert lease.history == [[i, i + 1] for i in range(3, HISTORY_OUTPUTS + 3)]
    cache.checkin(lease, PROMPT)  # nothing generated: nothing added
    assert cache.checkout("doc", PROMPT).history == lease.history  # type: ignore[union-attr]


def test_without_the_native_step_or_greedy_sampling_lookup_changes_nothing(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **SHAPE))
    want = reference(model, PROMPT, 8)
    got, got_lp, gen = run(model, PROMPT, 8, Drafter(PROMPT, [want[0]]), 4,
                           model.new_cache(1, MAX_SEQ_LEN))
    assert (got, got_lp) == want and gen.stats.drafted == 0  # no step to check drafts with
    # sampled tokens are not checked against drafts, even with the native step
    engine.enable_fast_decode(model, MAX_SEQ_LEN)
    try:
        sampled = engine.SamplingParams(max_tokens=8, temperature=0.7, seed=3)
        a = list(engine.stream(PROMPT, model, sampled, eos_id=-1))
        plain = Generation(model, [PROMPT], sampled, eos_id=-1,
                           drafter=Drafter(PROMPT, [want[0]]), lookup=4)
        b = list(engine.stream(PROMPT, model, sampled, eos_id=-1, lookup=4))
    finally:
        model.decoder = None
    assert plain.drafter is None
    assert [e for e in a if isinstance(e, engine.TokenEvent)] == \
        [e for e in b if isinstance(e, engine.TokenEvent)]


def test_a_negative_lookup_is_refused(make_checkpoint: CheckpointFactory) -> None:
    model = engine.load(make_checkpoint("native", **SHAPE))
    with pytest.raises(ValueError, match="lookup must be >= 0, got -1"):
        engine.stream(PROMPT, model, lookup=-1)


# -- how long a draft is -----------------------------------------------------------------------

def test_the_draft_length_with_the_most_tokens_per_cost_is_chosen() -> None:
    """k drafted tokens, each taken with chance p up to the first wrong one: 1 + p + ... + p^k
    tokens for a pass of k + 1 positions; against one token for a step."""
    policy = DraftPolicy(costs={1: 1.0, 2: 1.2, 3: 1.5, 4: 2.4}, accept=0.8, learn=False)
    # k = 1: 1.8 / 1.2 = 1.5; k = 2: 2.44 / 1.5 = 1.63; k = 3: 2.952 / 2.4 = 1.23
    assert [policy.length(room, 3) for room in (0, 1, 2, 3)] == [0, 1, 2, 2]
    unlikely = DraftPolicy(costs={1: 1.0, 2: 1.2, 3: 1.5, 4: 2.4}, accept=0.1, learn=False)
    assert unlikely.length(3, 3) == 0  # 1.1 / 1.2 < 1: a plain step pays better
    free = DraftPolicy(costs=dict.fromkeys(range(1, 9), 1.0), accept=0.1, learn=False)
    assert free.length(7, 1) == 7  # a pass costs a step: any chance is worth it
    # not measured: assumed cheap, so that each length gets tried
    assert DraftPolicy(accept=0.5).length(3, 1) == 2  # 1.75 / 1.2 against 1.875 / 1.3


def test_the_policy_learns_costs_and_chances_per_match_length() -> None:
    policy = DraftPolicy()
    policy.measured(1, 0.5)  # the first of each length is dropped (warm-up)
    policy.measured(2, 5.0)
    assert policy.costs == {}
    policy.measured(1, 1.0)
    policy.measured(2, 2.0)
    policy.measured(2, 3.0)
    assert policy.costs == {1: 1.0, 2: 2.25}  # a moving average, weight 0.25
    assert policy.ratio(2) == 2.25 and policy.ratio(3) == 1.2  # 3: not measured yet
    policy.checked(3, drafted=4, agreed=2)  # two taken (0.5 -> 0.55 -> 0.595), one wrong
    assert policy.accept[3] == pytest.approx(0.5355)
    assert policy.accept[1] == policy.accept[2] == 0.5
    policy.checked(1, drafted=2, agreed=2)  # taken whole: the rest was never judged
    assert policy.accept[1] == pytest.approx(0.595)


def test_a_length_judged_not_to_pay_is_tried_again_now_and_then() -> None:
    policy = DraftPolicy(costs={1: 1.0, 2: 3.0, 3: 4.0}, accept=0.3)
    choices = [policy.length(2, 2) for _ in range(2 * EXPLORE_EVERY)]
    assert choices.count(1) == 2 and choices.count(0) == 2 * EXPLORE_EVERY - 2
    assert choices[EXPLORE_EVERY - 1] == choices[-1] == 1


@needs_kernels
def test_drafts_that_are_never_right_are_soon_not_checked(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every draft wrong, and a pass of two positions costing 1.5 steps (a stand-in for a CPU
    whose loops take each row on its own): a draft of one token pays while its chance p is
    above 0.5 (1 + p tokens for 1.5 steps). From 0.9, each rejection takes a tenth off: six
    drafts, then only the exploring ones (decisions 16 and 32 of the 39 steps); the output
    stays the plain one."""
    model = engine.load(make_checkpoint("native", **SHAPE))
    decoder = engine.enable_fast_decode(model, MAX_SEQ_LEN, rewind=5)
    try:
        want, _ = reference(model, PROMPT, 40)
        policy = policy_for(decoder)
        policy.costs = {1: 1.0, 2: 1.5, 3: 2.0}
        policy.accept = dict.fromkeys(policy.accept, 0.9)
        monkeypatch.setattr(policy, "measured", lambda rows, seconds: None)
        drafter = Scripted(want, 0, model.config.vocab_size)
        got, _, gen = run(model, PROMPT, 40, drafter, 2, decoder.new_cache())
    finally:
        model.decoder = None
    assert got == want
    assert (gen.stats.drafted, gen.stats.accepted) == (6 + 2, 0)
    assert policy.accept[MAX_NGRAM] == pytest.approx(0.9 ** 9)
