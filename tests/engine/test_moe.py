"""Mixture of experts (Mixtral): routing, grouped dispatch, loading, parity with transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import engine
from engine.arch.config import MoeConfig
from engine.arch.moe import MoeFeedForward, route
from engine.checkpoints.dense import (
    from_hf_config,
    from_params,
    hf_to_native_name,
    native_to_hf_name,
)
from engine.runtime.compiled import FastDecoder
from tests.conftest import CheckpointFactory
from tests.engine.test_parity import hf_greedy, hf_model

ATOL = 1e-4
# 4 experts, 2 per token; GQA, head_dim * n_heads != dim, and a sliding window shorter than the
# prompts, so MoE is checked together with everything the dense parity tests cover.
SHAPE: dict[str, Any] = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                             n_layers=2, sliding_window=7, rope_theta=10000.0, moe=(4, 2))
PROMPTS = [
    [1, *range(300, 331)],
    [1, 9, 25, 400, 7, 12345],
    [1, 4000, 4001],
]


def test_route_takes_top_k_logits_and_softmaxes_over_them() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, -2.0]])
    weights, experts = route(logits, 2)
    assert experts.tolist() == [[0, 1], [2, 1]]
    sigmoid = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))]
    want = torch.tensor([[sigmoid[0], 1 - sigmoid[0]], [sigmoid[1], 1 - sigmoid[1]]])
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, want, atol=1e-7, rtol=0)


def test_route_equals_transformers_softmax_topk_renormalise() -> None:
    """HF's formula (softmax over all experts, top-k, renormalise) is the same function."""
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    weights, experts = route(logits, 2)
    probs = torch.softmax(logits, dim=-1)
    top, hf_experts = torch.topk(probs, 2, dim=-1)
    assert torch.equal(experts, hf_experts)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True), atol=1e-6, rtol=0)


def _moe_layer(seed: int = 0) -> MoeFeedForward:
    torch.manual_seed(seed)
    layer = MoeFeedForward(8, 16, MoeConfig(num_experts=4, num_experts_per_tok=2))
    return layer.eval().requires_grad_(False)


def test_output_is_the_routed_weighted_sum_of_experts() -> None:
    layer = _moe_layer()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    got = layer(x)
    flat = x.reshape(-1, 8)
    weights, experts = route(layer.gate(flat), 2)
    want = torch.stack([
        sum(weights[t, j] * layer.experts[int(experts[t, j])](flat[t:t + 1])[0]
            for j in range(2))
        for t in range(flat.shape[0])
    ]).view(2, 5, 8)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_each_active_expert_runs_once_on_all_its_tokens_and_idle_experts_never() -> None:
    layer = _moe_layer()
    with torch.no_grad():
        # Positive inputs: experts 0 and 1 score sum(x) > 0, experts 2 and 3 score -sum(x).
        layer.gate.weight.copy_(torch.tensor([[1.0] * 8, [0.5] * 8, [-1.0] * 8, [-2.0] * 8]))
    calls: dict[int, list[int]] = {e: [] for e in range(4)}
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(
            lambda _m, args, _out, e=e: calls[e].append(args[0].shape[0]))
    x = torch.rand(3, 4, 8, generator=torch.Generator().manual_seed(2)) + 0.1
    layer(x)
    assert calls == {0: [12], 1: [12], 2: [], 3: []}


def test_hf_mixtral_names_map_to_native_keys_and_back() -> None:
    pairs = {
        "model.layers.3.block_sparse_moe.gate.weight": "layers.3.feed_forward.gate.weight",
        "model.layers.0.block_sparse_moe.experts.7.w2.weight":
            "layers.0.feed_forward.experts.7.w2.weight",
        "model.layers.1.mlp.up_proj.weight": "layers.1.feed_forward.w3.weight",
    }
    for hf, native in pairs.items():
        assert hf_to_native_name(hf) == native
        assert native_to_hf_name(native) == hf
    assert hf_to_native_name("model.layers.0.block_sparse_moe.experts.0.w4.weight") is None


def test_configs_parse_moe_from_both_layouts(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "vocab_size": 32768}
    params.write_text(json.dumps({**base, "moe": {"num_experts": 8, "num_experts_per_tok": 2}}))
    # Mixtral's params.json has no rope_theta: it was trained with 1e6, not the legacy 1e4.
    assert (from_params(params).moe, from_params(params).rope_theta) == (MoeConfig(8, 2), 1e6)
    params.write_text(json.dumps({**base, "moe": None}))
    assert (from_params(params).moe, from_params(params).rope_theta) == (None, 1e4)
    params.write_text(json.dumps({**base, "moe": {"num_experts": 2, "num_experts_per_tok": 3}}))
    with pytest.raises(engine.ModelLoadError) as e:
        from_params(params)
    assert e.value.problem == "moe.num_experts_per_tok (3) exceeds moe.num_experts (2)"
    params.write_text(json.dumps({**base, "moe": {"num_experts": 8}}))
    with pytest.raises(engine.ModelLoadError) as e:
        from_params(params)
    assert e.value.problem == "missing required field 'num_experts_per_tok'"

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 32000,
        "num_local_experts": 8, "num_experts_per_tok": 2}))
    assert from_hf_config(config).moe == MoeConfig(8, 2)


def test_native_and_hf_tiny_checkpoints_describe_a_mixtral(
        make_checkpoint: CheckpointFactory) -> None:
    params = json.loads((make_checkpoint("native", **SHAPE) / "params.json").read_text())
    assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    hf = json.loads((make_checkpoint("hf", **SHAPE) / "config.json").read_text())
    assert (hf["architectures"], hf["num_local_experts"], hf["num_experts_per_tok"]) == (
        ["MixtralForCausalLM"], 4, 2)
    model = engine.load(make_checkpoint("native", **SHAPE))
    layers: Any = model.module.layers
    assert isinstance(layers[0].feed_forward, MoeFeedForward)
    assert getattr(model.config, "moe", None) == MoeConfig(4, 2)


@pytest.fixture(scope="module")
def folders(make_checkpoint: CheckpointFactory) -> dict[str, Path]:
    return {layout: make_checkpoint(layout, **SHAPE) for layout in ("native", "hf")}


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> transformers.PreTrainedModel:
    model = hf_model(folders["hf"])
    assert type(model).__name__ == "MixtralForCausalLM"
    return model


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_greedy_tokens_and_logprobs_match_transformers_mixtral(
        folders: dict[str, Path], reference: transformers.PreTrainedModel, layout: str) -> None:
    model = engine.load(folders[layout])
    for prompt in PROMPTS[:2]:
        want_tokens, want_logprobs = hf_greedy(reference, prompt, 12)
        tokens, logprobs = engine.generate([prompt], model, max_tokens=12, eos_id=-1)
        assert tokens[0] == want_tokens
        assert logprobs[0] == pytest.approx(want_logprobs, abs=ATOL)


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_full_sequence_logprobs_match_transformers_mixtral(
        folders: dict[str, Path], reference: transformers.PreTrainedModel, layout: str) -> None:
    model = engine.load(folders[layout])
    prompt = PROMPTS[0]
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([prompt])).logits.float(), -1)
        cache = model.new_cache(1, len(prompt))
        got = torch.log_softmax(
            model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache), -1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_batched_unequal_chunked_matches_transformers_mixtral_per_prompt(
        folders: dict[str, Path], reference: transformers.PreTrainedModel, layout: str) -> None:
    model = engine.load(folders[layout])
    tokens, logprobs = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1, chunk_size=5)
    for prompt, got_tokens, got_logprobs in zip(PROMPTS, tokens, logprobs, strict=True):
        want_tokens, want_logprobs = hf_greedy(reference, prompt, 8)
        assert got_tokens == want_tokens
        assert got_logprobs == pytest.approx(want_logprobs, abs=ATOL)


def test_routing_matters(make_checkpoint: CheckpointFactory) -> None:
    """Guards the parity tests: one expert per token instead of two changes the log-probs."""
    two = engine.load(make_checkpoint("native", **SHAPE))
    one = engine.load(make_checkpoint("native", **{**SHAPE, "moe": (4, 1)}))
    _, lp_two = engine.generate([PROMPTS[0]], two, max_tokens=1, eos_id=-1)
    _, lp_one = engine.generate([PROMPTS[0]], one, max_tokens=1, eos_id=-1)
    assert abs(lp_two[0][0] - lp_one[0][0]) > 1e-3


def test_fast_decoder_refuses_moe(folders: dict[str, Path]) -> None:
    model = engine.load(folders["native"])
    with pytest.raises(engine.EngineError) as e:
        FastDecoder(model, 1, 64, compile=False)
    assert str(e.value) == ("the compiled decode step supports dense decoders (MoE layers route "
                            "tokens in Python): this model decodes eagerly")
