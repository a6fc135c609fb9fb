"""The compiled decode step (`engine.runtime.compiled`) computes what the eager forward
computes, and the generation loop uses it for caches of its geometry only."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.runtime.compiled import FastDecoder
from tests.conftest import CheckpointFactory

SHAPE = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, n_layers=2)
PROMPT = [1, *range(300, 330)]


@pytest.fixture(scope="module", params=[None, [8, None]], ids=["full", "window8-and-full"])
def model(request: pytest.FixtureRequest, make_checkpoint: CheckpointFactory) -> engine.Model:
    return engine.load(make_checkpoint("native", sliding_window=request.param, **SHAPE))


def count_steps(decoder: FastDecoder) -> list[int]:
    """Count the decoder's steps from now on, in the returned one-element list: `step`, and
    `greedy` where it runs one (the native step with greedy sampling)."""
    calls = [0]
    step, greedy = decoder.step, decoder.greedy

    def counting_step(*args: object) -> torch.Tensor:
        calls[0] += 1
        return step(*args)  # type: ignore[arg-type]

    def counting_greedy(*args: object) -> tuple[list[int], list[float]] | None:
        picked = greedy(*args)  # type: ignore[arg-type]
        calls[0] += picked is not None
        return picked

    decoder.step = counting_step  # type: ignore[method-assign]
    decoder.greedy = counting_greedy  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("rewind", [0, 5])
def test_eager_step_equals_the_model_forward(model: engine.Model, rewind: int) -> None:
    """Decode 20 tokens past a 31-token prompt (the window of 8 wraps many times)."""
    decoder = FastDecoder(model, batch_size=1, max_seq_len=64, rewind=rewind, compile=False)
    fast, slow = decoder.new_cache(), model.new_cache(1, 64, rewind)
    tokens = torch.tensor([PROMPT])
    with torch.inference_mode():
        for cache in (fast, slow):
            model.forward(tokens, torch.arange(len(PROMPT))[None], cache)
        token = torch.tensor([7])
        for pos in range(len(PROMPT), len(PROMPT) + 20):
            got = decoder.step(token, torch.tensor([pos]), fast)
            want = model.forward(token[:, None], torch.tensor([[pos]]), slow,
                                 output_index=torch.zeros(1, dtype=torch.long))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            token = want.argmax(-1)


def test_generation_uses_the_compiled_step_and_agrees_with_eager(model: engine.Model) -> None:
    eager_tokens, eager_logprobs = engine.generate([PROMPT], model, max_tokens=16, eos_id=-1)
    decoder = engine.enable_fast_decode(model, 64)
    calls = count_steps(decoder)
    try:
        tokens, logprobs = engine.generate([PROMPT], model, max_tokens=16, eos_id=-1)
        # A batch of two and a request longer than the decoder's cache stay eager.
        engine.generate([PROMPT, PROMPT[:5]], model, max_tokens=4, eos_id=-1)
        engine.generate([PROMPT], model, max_tokens=40, eos_id=-1)
    finally:
        model.decoder = None
    assert calls[0] == 15  # every step after the first token, of the first request only
    assert tokens == eager_tokens
    assert logprobs[0] == pytest.approx(eager_logprobs[0], abs=1e-4)


def test_a_cache_of_another_geometry_is_refused(model: engine.Model) -> None:
    decoder = FastDecoder(model, batch_size=1, max_seq_len=64, compile=False)
    with pytest.raises(ValueError, match=r"cache geometry \(1, .*\) differs from the decoder's"):
        decoder.step(torch.tensor([3]), torch.tensor([0]), model.new_cache(1, 32))
    assert not decoder.accepts(model.new_cache(2, 64))
    assert decoder.accepts(model.new_cache(1, 64))


def test_a_prefix_cache_leaving_a_few_tokens_prefills_them_with_the_compiled_step(
        model: engine.Model) -> None:
    cache = engine.PrefixCache(model, max_seq_len=64, budget_bytes=2**26, rewind=8)
    decoder = FastDecoder(model, batch_size=1, max_seq_len=64, rewind=8, compile=False)
    sampling = engine.SamplingParams(max_tokens=5)
    grown = [*PROMPT, 11, 12]
    want = list(engine.stream(grown, model, sampling, eos_id=-1))  # eager, no cache
    model.decoder = decoder
    calls = count_steps(decoder)
    try:
        list(engine.stream(PROMPT, model, sampling, eos_id=-1, prefix_cache=cache,
                           cache_key="doc"))
        calls[0] = 0
        got = list(engine.stream(grown, model, sampling, eos_id=-1, prefix_cache=cache,
                                 cache_key="doc"))
    finally:
        model.decoder = None
    assert got[-1].cached_tokens == len(PROMPT)  # type: ignore[union-attr]
    assert calls[0] == 2 + 4  # the two new prompt tokens, then four decode steps
    assert [e.token for e in got[:-1]] == [e.token for e in want[:-1]]  # type: ignore[union-attr]
    assert [e.logprob for e in got[:-1]] == pytest.approx(  # type: ignore[union-attr]
        [e.logprob for e in want[:-1]], abs=1e-4)  # type: ignore[union-attr]
