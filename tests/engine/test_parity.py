"""Our engine against Hugging Face transformers (the reference) on tiny random checkpoints.

Both layouts of one set of weights: the HF copy is loaded by transformers, and by us through the
rotary permutation; the native copy by us directly. Tokens must be identical and log-probs
within 1e-4 (float32).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import engine
from tests.conftest import CheckpointFactory

ATOL = 1e-4

# GQA (4 heads, 2 kv heads), head_dim 16 with dim 48 (n_heads * head_dim != dim),
# and a sliding window much shorter than the prompts.
SHAPE = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, n_layers=3,
             sliding_window=7, rope_theta=10000.0)


def hf_model(folder: object) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int],
              n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their log-probs from the raw logits.

    (`min_new_tokens` makes transformers mask EOS in its processed `scores`, which moves every
    log-prob by EOS's share: the raw `logits` are what our `eos_id=-1` run must match.)
    """
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item()
                for s, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


PROMPTS = [
    [1, *range(300, 331)],  # 32 tokens, > 4 windows
    [1, 9, 25, 400, 7, 12345],
]


@pytest.fixture(scope="module")
def folders(make_checkpoint: CheckpointFactory) -> dict[str, object]:
    return {layout: make_checkpoint(layout, **SHAPE) for layout in ("native", "hf")}


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_greedy_tokens_and_logprobs_match_transformers(folders: dict[str, object],
                                                       layout: str) -> None:
    reference = hf_model(folders["hf"])
    model = engine.load(folders[layout])  # type: ignore[arg-type]
    for prompt in PROMPTS:
        want_tokens, want_logprobs = hf_greedy(reference, prompt, 16)
        tokens, logprobs = engine.generate([prompt], model, max_tokens=16, eos_id=-1)
        assert tokens[0] == want_tokens
        assert logprobs[0] == pytest.approx(want_logprobs, abs=ATOL)


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_full_sequence_logits_match_transformers(folders: dict[str, object], layout: str) -> None:
    reference = hf_model(folders["hf"])
    model = engine.load(folders[layout])  # type: ignore[arg-type]
    prompt = PROMPTS[0]
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([prompt])).logits.float(), -1)
    cache = model.new_cache(1, len(prompt))
    with torch.no_grad():
        got = torch.log_softmax(
            model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache), -1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_batched_unequal_chunked_matches_transformers_per_prompt(
        folders: dict[str, object]) -> None:
    reference = hf_model(folders["hf"])
    model = engine.load(folders["native"])  # type: ignore[arg-type]
    tokens, logprobs = engine.generate(PROMPTS, model, max_tokens=10, eos_id=-1, chunk_size=5)
    for prompt, got_tokens, got_logprobs in zip(PROMPTS, tokens, logprobs, strict=True):
        want_tokens, want_logprobs = hf_greedy(reference, prompt, 10)
        assert got_tokens == want_tokens
        assert got_logprobs == pytest.approx(want_logprobs, abs=ATOL)


def test_sliding_window_is_applied(make_checkpoint: CheckpointFactory) -> None:
    """Guards the parity tests: with the window removed the same weights give other logits."""
    windowed = engine.load(make_checkpoint("native", **SHAPE))
    full = engine.load(make_checkpoint("native", **{**SHAPE, "sliding_window": None}))
    prompt = PROMPTS[0]
    _, lp_windowed = engine.generate([prompt], windowed, max_tokens=3, eos_id=-1)
    _, lp_full = engine.generate([prompt], full, max_tokens=3, eos_id=-1)
    assert abs(lp_windowed[0][0] - lp_full[0][0]) > 1e-3


def test_long_prompt_through_rotating_buffer_matches_transformers(
        make_checkpoint: CheckpointFactory) -> None:
    """A 600-token prompt on a 16-token window: the cache holds 16 slots, wraps 37 times."""
    shape = {**SHAPE, "sliding_window": 16, "n_layers": 2}
    reference = hf_model(make_checkpoint("hf", **shape))
    model = engine.load(make_checkpoint("native", **shape))
    prompt = [1, *[(i * 7919) % 30000 + 100 for i in range(599)]]
    want_tokens, want_logprobs = hf_greedy(reference, prompt, 8)
    for chunk in (None, 5, 16, 100):
        tokens, logprobs = engine.generate([prompt], model, max_tokens=8, eos_id=-1,
                                           chunk_size=chunk)
        assert tokens[0] == want_tokens, chunk
        assert logprobs[0] == pytest.approx(want_logprobs, abs=ATOL)
