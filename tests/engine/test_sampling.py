"""Sampling is pure: logits in, token out. Exact distributions on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from engine.runtime.sampling import SamplingParams, filtered_probs, sample, token_logprobs

# probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1
LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
# no ties: probabilities 0.5, 0.25, 0.15, 0.1
DISTINCT = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [1, 0]


def test_temperature_scales_logits() -> None:
    probs = filtered_probs(LOGITS, SamplingParams(temperature=0.5))
    want = torch.tensor([0.25, 0.0625, 0.015625, 0.015625])
    torch.testing.assert_close(probs[0], want / want.sum())


def test_top_k_keeps_the_k_most_likely() -> None:
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs[0], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_top_k_keeps_tokens_tied_with_the_kth() -> None:
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_k=3))
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.25, 0.125, 0.125]))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs[0], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    # exactly reaching p with the first token keeps only it
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(probs[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # a tiny p still keeps the most likely token
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, top_p=1e-6))
    torch.testing.assert_close(probs[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_top_k_then_top_p_combine() -> None:
    # top_k=3 renormalises to 5/9, 5/18, 1/6; top_p=0.8 then keeps the first two.
    probs = filtered_probs(DISTINCT, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    torch.testing.assert_close(probs[0], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(DISTINCT, params, gen) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[3].item() == 0.0
    torch.testing.assert_close(freq[:3], torch.tensor([5 / 9, 5 / 18, 1 / 6]), atol=0.03, rtol=0)


def test_same_seed_same_draws() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    a = [sample(logits, params, torch.Generator().manual_seed(3)).tolist() for _ in range(2)]
    assert a[0] == a[1]


def test_logprobs_are_under_the_unmodified_model() -> None:
    lp = token_logprobs(LOGITS, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.25))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -3}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"max_tokens": -1}, "max_tokens must be an integer >= 0"),
        ({"seed": -2}, "seed must be a non-negative integer"),
    ],
)
def test_out_of_range_values_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
