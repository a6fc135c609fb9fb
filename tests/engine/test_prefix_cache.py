"""The per-document prefix cache: reuse is exact (logits of a full recompute), bounded by its
budget, least recently used first out, and freed on drop."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import engine
from engine.runtime.prefix_cache import PrefixCache, common_prefix_length
from tests.conftest import CheckpointFactory

SHAPE = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, n_layers=2)
BASE = [1, *range(400, 460)]  # 61 tokens


@pytest.fixture(scope="module", params=[None, 6, [6, None]],
                ids=["full", "window6", "window6-and-full"])
def model(request: pytest.FixtureRequest, make_checkpoint: CheckpointFactory) -> engine.Model:
    return engine.load(make_checkpoint("native", sliding_window=request.param, **SHAPE))


def run(model: engine.Model, prompt: list[int], cache: PrefixCache | None = None,
        key: str = "doc", max_tokens: int = 6, **kwargs: object
        ) -> tuple[list[int], list[float], engine.EndEvent]:
    tokens, logprobs = [], []
    end = None
    for event in engine.stream(prompt, model, engine.SamplingParams(max_tokens=max_tokens),
                               eos_id=-1, prefix_cache=cache, cache_key=key, **kwargs):
        if isinstance(event, engine.TokenEvent):
            tokens.append(event.token)
            logprobs.append(event.logprob)
        else:
            end = event
    assert end is not None
    return tokens, logprobs, end


def assert_same_as_recompute(model: engine.Model, cache: PrefixCache, prompt: list[int],
                             reused: int) -> None:
    tokens, logprobs, end = run(model, prompt, cache)
    want_tokens, want_logprobs, _ = run(model, prompt)
    assert end.cached_tokens == reused
    assert tokens == want_tokens
    assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


def new_cache(model: engine.Model, **kwargs: int) -> PrefixCache:
    size = dict(max_seq_len=128, budget_bytes=2**30, rewind=16) | kwargs
    return PrefixCache(model, **size)


def test_the_logits_after_reuse_equal_a_full_recompute(model: engine.Model) -> None:
    cache = new_cache(model)
    run(model, BASE, cache)
    prompt = [*BASE, 7, 8, 9]
    lease = cache.checkout("doc", prompt)
    assert lease is not None and lease.reused == len(BASE)
    fresh = model.new_cache(1, 128)
    with torch.inference_mode():
        got = model.forward(torch.tensor([prompt[lease.reused:]]),
                            torch.arange(lease.reused, len(prompt))[None], lease.cache)
        want = model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], fresh)
    torch.testing.assert_close(got[0], want[0, lease.reused:], atol=1e-4, rtol=0)


def test_appended_text_reuses_the_whole_previous_prompt(model: engine.Model) -> None:
    cache = new_cache(model)
    run(model, BASE, cache)
    assert_same_as_recompute(model, cache, [*BASE, 5, 6, 7], reused=len(BASE))
    assert_same_as_recompute(model, cache, [*BASE, 5, 6, 7, 8], reused=len(BASE) + 3)


def test_an_edit_in_the_middle_reuses_up_to_the_edit(model: engine.Model) -> None:
    cache = new_cache(model, rewind=64)
    run(model, BASE, cache)
    edited = list(BASE)
    edited[50] = 33
    assert_same_as_recompute(model, cache, edited, reused=50)


def test_a_changed_suffix_of_a_fim_prompt_reuses_up_to_the_change(model: engine.Model) -> None:
    def fim(prefix: str, suffix: str) -> list[int]:
        return engine.encode_fim(model.tokenizer, prefix, suffix)

    cache = new_cache(model, rewind=64)
    first = fim("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n")
    run(model, first, cache)
    second = fim("def add(a, b):\n    return ", "\n\nprint(add(3, 4))\n")
    same = common_prefix_length(first, second)
    assert 3 < same < len(second) - 5  # the change is inside the suffix
    assert_same_as_recompute(model, cache, second, reused=same)


def test_a_cut_deeper_than_the_rewind_margin_is_recomputed_exactly(
        model: engine.Model) -> None:
    cache = new_cache(model, rewind=4)
    run(model, BASE, cache, max_tokens=10)  # the cache now holds the prompt and 9 more tokens
    edited = list(BASE)
    edited[40] = 33
    windowed = any(w is not None for w in model.config.sliding_windows)
    # A window of 6 with 4 spare slots has overwritten the keys position 40 needs.
    assert_same_as_recompute(model, cache, edited, reused=0 if windowed else 40)


def test_accepting_the_completion_reuses_the_generated_tokens(model: engine.Model) -> None:
    cache = new_cache(model)
    tokens, _, _ = run(model, BASE, cache, max_tokens=6)
    # The last generated token was never fed back: 5 of the 6 are in the cache.
    assert_same_as_recompute(model, cache, [*BASE, *tokens, 3], reused=len(BASE) + 5)


def test_a_cancelled_prefill_keeps_the_chunks_it_computed(model: engine.Model) -> None:
    cache = new_cache(model)
    token = engine.CancellationToken()
    chunks = 0

    def forward(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal chunks
        chunks += 1
        if chunks == 2:
            token.cancel()  # during the second chunk
        return original(*args, **kwargs)  # type: ignore[arg-type]

    original = model.forward
    model.forward = forward  # type: ignore[method-assign]
    try:
        _, _, end = run(model, BASE, cache, cancel=token, chunk_size=16)
    finally:
        model.forward = original  # type: ignore[method-assign]
    assert end.reason == "cancelled" and chunks == 2
    assert_same_as_recompute(model, cache, BASE, reused=32)


def test_least_recently_used_documents_are_evicted_within_the_budget(
        model: engine.Model) -> None:
    probe = new_cache(model)
    cache = new_cache(model, budget_bytes=2 * probe.entry_bytes + 1)
    assert cache.max_entries == 2
    for key in ("a", "b", "a", "c"):  # c evicts b, the least recently used
        run(model, BASE, cache, key=key)
    assert cache.cached_keys() == ["a", "c"]
    assert cache.nbytes() == 2 * cache.entry_bytes <= cache.budget_bytes
    assert run(model, BASE, cache, key="b")[2].cached_tokens == 0
    assert run(model, BASE, cache, key="b")[2].cached_tokens == len(BASE) - 1


def test_drop_frees_the_document_cache(model: engine.Model) -> None:
    cache = new_cache(model)
    run(model, BASE, cache, key="a")
    run(model, BASE, cache, key="b")
    lease = cache.checkout("a", BASE)
    assert lease is not None
    tensors = weakref.ref(lease.cache.keys[0])
    cache.checkin(lease, BASE[:lease.reused])
    del lease
    assert cache.drop("a") and not cache.drop("a")
    gc.collect()
    assert tensors() is None
    assert cache.cached_keys() == ["b"] and cache.nbytes() == cache.entry_bytes


def test_a_document_dropped_while_its_request_runs_is_freed_at_checkin(
        model: engine.Model) -> None:
    cache = new_cache(model)
    lease = cache.checkout("a", BASE)
    assert lease is not None
    assert cache.checkout("a", BASE) is None  # one request per document at a time
    assert cache.drop("a")
    cache.checkin(lease, BASE)
    assert cache.cached_keys() == []


def test_a_budget_smaller_than_one_document_disables_caching(model: engine.Model) -> None:
    cache = new_cache(model, budget_bytes=1000)
    assert cache.max_entries == 0 and cache.nbytes() == 0
    assert run(model, BASE, cache)[2].cached_tokens == 0
    assert run(model, BASE, cache)[2].cached_tokens == 0


def test_a_request_longer_than_the_cache_runs_without_it(model: engine.Model) -> None:
    cache = new_cache(model, max_seq_len=40)
    tokens, _, end = run(model, BASE, cache)
    assert end.cached_tokens == 0 and cache.cached_keys() == []
    assert tokens == run(model, BASE)[0]
    # The prompt fits, the prompt and its 6 generated tokens do not: all 6 are generated.
    cache = new_cache(model, max_seq_len=len(BASE) + 3)
    tokens, _, end = run(model, BASE, cache)
    assert len(tokens) == 6 and cache.cached_keys() == []


@pytest.mark.parametrize("first_difference", [0, 1, 63, 64, 65, 127, 128, 200, None])
def test_common_prefix_length_finds_the_first_difference_across_its_blocks(
        first_difference: int | None) -> None:
    """It compares blocks of 64 tokens at a time, then one block token by token: the answer is
    the index of the first difference wherever it falls, or the shorter length."""
    a = list(range(1000, 1300))
    b = list(a)
    if first_difference is not None:
        b[first_difference] = -1
        b[first_difference + 5] = -2  # a later difference does not matter
        assert common_prefix_length(a, b) == first_difference
        assert common_prefix_length(tuple(b), a) == first_difference
    else:
        assert common_prefix_length(a, b) == 300
        assert common_prefix_length(a, b[:129]) == 129
        assert common_prefix_length(a[:64], b) == 64
        assert common_prefix_length([], b) == 0
