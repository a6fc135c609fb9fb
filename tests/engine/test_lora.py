"""LoRA adapters: parity with transformers on merged weights, switching, unloading, errors."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import engine
from engine.arch.lora import LoRALinear
from engine.checkpoints.tiny import random_state_dict, tiny_config, write_checkpoint
from tests.conftest import CheckpointFactory
from tests.engine.test_fast_decode import count_steps
from tests.engine.test_moe import hf_greedy
from tests.engine.test_parity import hf_model

ATOL = 1e-4
DENSE: dict[str, Any] = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                             n_layers=2, sliding_window=7, rope_theta=10000.0)
MOE: dict[str, Any] = {**DENSE, "moe": (4, 2)}
PROMPT = [1, *range(300, 321)]


def adapter_weights(shape: dict[str, Any], rank: int = 4, seed: int = 1,
                    experts_only: bool = False) -> dict[str, torch.Tensor]:
    """Random A and B for every attention and feed-forward linear (each expert's, for MoE),
    sized so that the adapter changes the model's choices."""
    config = tiny_config("v3", **shape)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    base = random_state_dict(config)
    out = {}
    for key, w in base.items():
        module = key.removesuffix(".weight")
        if not module.startswith("layers.") or "norm" in module or module.endswith(".gate"):
            continue
        if experts_only and ".experts." not in module:
            continue
        n_out, n_in = w.shape
        out[f"{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / math.sqrt(n_in)
        out[f"{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.3 / rank
    return out


def merged(shape: dict[str, Any], adapter: dict[str, torch.Tensor],
           scaling: float) -> dict[str, torch.Tensor]:
    """W + scaling * B @ A in native names and layout (write_checkpoint permutes q/k for HF)."""
    state = random_state_dict(tiny_config("v3", **shape))  # type: ignore[arg-type]
    for key in list(state):
        a = adapter.get(key.replace(".weight", ".lora_A.weight"))
        if a is not None:
            b = adapter[key.replace(".weight", ".lora_B.weight")]
            state[key] = state[key] + scaling * (b @ a)
    return state


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor],
                  params: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "lora.safetensors"))
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
    return folder


def logits(model: engine.Model, prompt: list[int] = PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        cache = model.new_cache(1, len(prompt))
        return model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)


def plain_linears(model: engine.Model) -> bool:
    return not any(isinstance(m, LoRALinear) for m in model.module.modules())


@pytest.mark.parametrize("shape", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("layout", ["native", "hf"])
def test_base_plus_adapter_equals_transformers_with_merged_weights(
        make_checkpoint: CheckpointFactory, tmp_path: Path, shape: dict[str, object],
        layout: str) -> None:
    adapter = adapter_weights(shape)
    folder = write_adapter(tmp_path / "my-adapter", adapter,
                           {"dim": 48, "lora": {"enable": True, "rank": 4, "scaling": 1.5}})
    reference = hf_model(write_checkpoint(tmp_path / "merged", tiny_config(
        "v3", **shape), merged(shape, adapter, 1.5), layout="hf"))  # type: ignore[arg-type]
    model = engine.load(make_checkpoint(layout, **shape))
    assert model.load_lora(folder) == "my-adapter"
    want_tokens, want_logprobs = hf_greedy(reference, PROMPT, 10)
    with model.use_lora("my-adapter"):
        tokens, logprobs = engine.generate([PROMPT], model, max_tokens=10, eos_id=-1)
    assert tokens[0] == want_tokens
    assert logprobs[0] == pytest.approx(want_logprobs, abs=ATOL)
    base_tokens, _ = engine.generate([PROMPT], model, max_tokens=10, eos_id=-1)
    assert base_tokens[0] != want_tokens  # the adapter does change the model


def test_several_adapters_switch_per_request_and_unloading_restores_base_bitwise(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **MOE))
    base_state = {k: v.data_ptr() for k, v in model.module.state_dict().items()}
    before = logits(model)
    adapters = {"a": adapter_weights(MOE, seed=1), "b": adapter_weights(MOE, seed=2,
                                                                       experts_only=True)}
    want = {}
    for name, tensors in adapters.items():
        model.load_lora(write_adapter(tmp_path / name, tensors), scaling=2.0)
        want[name] = logits(engine.load(write_checkpoint(
            tmp_path / f"merged-{name}", tiny_config("v3", **MOE),  # type: ignore[arg-type]
            merged(MOE, tensors, 2.0))))
    assert model.loras == ["a", "b"]
    for name in ("a", "b", "a"):
        with model.use_lora(name):
            torch.testing.assert_close(logits(model), want[name], atol=ATOL, rtol=0)
    assert torch.equal(logits(model), before)  # outside use_lora: the base model
    with model.use_lora("a"), model.use_lora(None):
        assert torch.equal(logits(model), before)

    model.unload_lora("a")
    with model.use_lora("b"):
        torch.testing.assert_close(logits(model), want["b"], atol=ATOL, rtol=0)
    model.unload_lora("b")
    assert model.loras == []
    assert torch.equal(logits(model), before)
    assert plain_linears(model)
    assert {k: v.data_ptr() for k, v in model.module.state_dict().items()} == base_state


def test_active_adapter_is_per_thread(make_checkpoint: CheckpointFactory,
                                      tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **DENSE))
    before = logits(model)
    model.load_lora(write_adapter(tmp_path / "x", adapter_weights(DENSE)))
    with model.use_lora("x"):
        adapted = logits(model)
    entered, done = threading.Event(), threading.Event()
    seen: list[torch.Tensor] = []

    def worker() -> None:
        with model.use_lora("x"):
            entered.set()
            done.wait(10)
            seen.append(logits(model))

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(10)
    main = logits(model)  # while the worker is inside use_lora("x")
    done.set()
    thread.join(10)
    assert torch.equal(main, before)
    assert torch.equal(seen[0], adapted)
    assert not torch.equal(adapted, before)


def test_with_lora_runs_each_step_of_a_stream_with_the_adapter_and_nothing_in_between(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **DENSE))
    model.load_lora(write_adapter(tmp_path / "x", adapter_weights(DENSE)))
    with model.use_lora("x"):
        want, _ = engine.generate([PROMPT], model, max_tokens=6, eos_id=-1)
    sampling = engine.SamplingParams(max_tokens=6)
    tokens, between = [], []
    for event in model.with_lora("x", engine.stream(PROMPT, model, sampling, eos_id=-1)):
        between.append(model.active_lora)
        if isinstance(event, engine.TokenEvent):
            tokens.append(event.token)
    assert tokens == want[0]
    assert between == [None] * 7  # 6 tokens and the end event
    with pytest.raises(engine.EngineError) as e:
        model.with_lora("y", [])
    assert str(e.value) == "no LoRA adapter named 'y' is loaded (loaded: ['x'])"


def test_scaling_comes_from_the_argument_then_params_json_then_two(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **DENSE))
    tensors = adapter_weights(DENSE)
    results = {}
    for name, params, scaling in [("params", {"lora": {"scaling": 0.5}}, None),
                                  ("arg", None, 0.5), ("default", None, None),
                                  ("two", None, 2.0), ("override", {"lora": {"scaling": 9}}, 2.0)]:
        model.load_lora(write_adapter(tmp_path / name, tensors, params), scaling=scaling)
        with model.use_lora(name):
            results[name] = logits(model)
    assert torch.equal(results["params"], results["arg"])
    assert torch.equal(results["default"], results["two"])
    assert torch.equal(results["override"], results["two"])
    assert not torch.equal(results["arg"], results["two"])


def test_adapter_file_name_and_exact_dtype_upcast(make_checkpoint: CheckpointFactory,
                                                   tmp_path: Path) -> None:
    """A file path names the adapter by its stem; bfloat16 adapters run on a float32 model
    exactly as their float32 copy."""
    model = engine.load(make_checkpoint("native", **DENSE))
    tensors = {k: v.to(torch.bfloat16) for k, v in adapter_weights(DENSE).items()}
    save_file(tensors, str(tmp_path / "python-style.safetensors"))
    write_adapter(tmp_path / "f32", {k: v.float() for k, v in tensors.items()})
    assert model.load_lora(tmp_path / "python-style.safetensors") == "python-style"
    assert model.load_lora(tmp_path / "f32" / "lora.safetensors") == "f32"
    with model.use_lora("python-style"):
        got = logits(model)
    with model.use_lora("f32"):
        assert torch.equal(got, logits(model))


def _problem(model: engine.Model, path: Path, **kwargs: object) -> str:
    with pytest.raises(engine.ModelLoadError) as e:
        model.load_lora(path, **kwargs)  # type: ignore[arg-type]
    return e.value.problem


def test_bad_adapters_are_refused_naming_the_tensor_and_change_nothing(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **DENSE))
    before = logits(model)
    good = adapter_weights(DENSE)
    wq_a, wq_b = "layers.0.attention.wq.lora_A.weight", "layers.0.attention.wq.lora_B.weight"

    def bad(name: str, **changes: torch.Tensor | None) -> Path:
        tensors = {**good, **changes}
        return write_adapter(tmp_path / name, {k: v for k, v in tensors.items()
                                               if v is not None})

    assert _problem(model, bad("shape-b", **{wq_b: torch.zeros(50, 4)})) == (
        f"tensor {wq_b!r} has shape [50, 4], expected [64, 4]")
    assert _problem(model, bad("shape-a", **{wq_a: torch.zeros(4, 40)})) == (
        f"tensor {wq_a!r} has shape [4, 40], the layer needs [rank, 48]")
    assert _problem(model, bad("rank", **{wq_b: torch.zeros(64, 3)})) == (
        f"tensor {wq_b!r} has shape [64, 3], expected [64, 4]")
    assert _problem(model, bad("dtype", **{wq_a: torch.zeros(4, 48, dtype=torch.float64)})) == (
        f"tensor {wq_a!r} is float64, the model is float32: convert the adapter to float32")
    assert _problem(model, bad("missing-b", **{wq_b: None})) == (
        f"tensor {wq_a!r} has no 'layers.0.attention.wq.lora_B.weight' to go with it")
    unknown = "layers.7.attention.wq.lora_A.weight"
    assert _problem(model, bad("unknown", **{unknown: torch.zeros(4, 48)})) == (
        f"tensor {unknown!r}: the model has no linear layer 'layers.7.attention.wq'")
    assert _problem(model, bad("norm", **{"layers.0.ffn_norm.lora_A.weight":
                                          torch.zeros(4, 48)})) == (
        "tensor 'layers.0.ffn_norm.lora_A.weight': the model has no linear layer "
        "'layers.0.ffn_norm'")
    assert _problem(model, bad("foreign", **{"layers.0.attention.wq.weight":
                                             torch.zeros(64, 48)})) == (
        "tensor 'layers.0.attention.wq.weight' is not a LoRA weight (expected "
        "'<module>.lora_A.weight' or '<module>.lora_B.weight')")
    write_adapter(tmp_path / "rank-param", {wq_a: good[wq_a], wq_b: good[wq_b]},
                  {"lora": {"rank": 8}})
    assert _problem(model, tmp_path / "rank-param") == (
        f"tensor {wq_a!r} has rank 4, params.json says 8")
    assert _problem(model, tmp_path / "nowhere") == "file not found"
    (tmp_path / "empty").mkdir()
    assert _problem(model, tmp_path / "empty") == "no lora.safetensors in this folder"
    (tmp_path / "lora.pt").write_bytes(b"\x80")
    assert _problem(model, tmp_path / "lora.pt") == (
        "pickle files are refused (loading one can run arbitrary code); use the adapter's "
        ".safetensors file")
    assert _problem(model, bad("nan-scale"), scaling=float("nan")) == (
        "LoRA scaling must be a finite number, got nan")
    write_adapter(tmp_path / "bad-params", good, {"lora": {"scaling": "2"}})
    with pytest.raises(engine.ModelLoadError) as e:
        model.load_lora(tmp_path / "bad-params")
    assert (e.value.path, e.value.problem) == (
        tmp_path / "bad-params" / "params.json", "LoRA scaling must be a finite number, got '2'")
    assert model.loras == []
    assert plain_linears(model)
    assert torch.equal(logits(model), before)

    model.load_lora(bad("ok"))
    assert _problem(model, bad("ok")) == (
        "an adapter named 'ok' is already loaded; unload it first or pass another name")
    with pytest.raises(engine.EngineError) as e, model.use_lora("nope"):
        pass
    assert str(e.value) == "no LoRA adapter named 'nope' is loaded (loaded: ['ok'])"
    with pytest.raises(engine.EngineError) as e:
        model.unload_lora("nope")
    assert str(e.value) == "no LoRA adapter named 'nope' is loaded (loaded: ['ok'])"


def test_adapter_on_a_bfloat16_model_must_be_bfloat16(make_checkpoint: CheckpointFactory,
                                                      tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **DENSE), dtype="bfloat16")
    folder = write_adapter(tmp_path / "f32", adapter_weights(DENSE))
    problem = _problem(model, folder)
    assert problem.endswith("is float32, the model is bfloat16: load the model with "
                            "dtype='float32' or convert the adapter")
    tensors = {k: v.to(torch.bfloat16) for k, v in adapter_weights(DENSE).items()}
    assert model.load_lora(write_adapter(tmp_path / "bf16", tensors)) == "bf16"


def test_a_decode_step_built_with_adapters_loaded_runs_the_base_and_steps_aside_for_them(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    """The compiled step calls the layers, LoRA-wrapped ones included: with no adapter active
    it computes the base model; while one is active, the generation loop decodes eagerly."""
    model = engine.load(make_checkpoint("native", **DENSE))
    base, _ = engine.generate([PROMPT], model, max_tokens=6, eos_id=-1)
    tensors = adapter_weights(DENSE)
    model.load_lora(write_adapter(tmp_path / "x", tensors))
    decoder = engine.enable_fast_decode(model, 64, compile=False)
    calls = count_steps(decoder)
    assert engine.generate([PROMPT], model, max_tokens=6, eos_id=-1)[0] == base
    assert calls[0] == 5  # every step after the first token
    with model.use_lora("x"):
        adapted, _ = engine.generate([PROMPT], model, max_tokens=6, eos_id=-1)
    assert calls[0] == 5  # none while the adapter was active
    merged_model = engine.load(write_checkpoint(tmp_path / "merged", tiny_config(
        "v3", **DENSE), merged(DENSE, tensors, 2.0)))  # type: ignore[arg-type]
    assert adapted == engine.generate([PROMPT], merged_model, max_tokens=6, eos_id=-1)[0]


def test_loading_an_adapter_sets_the_fast_decoder_aside_until_the_last_unload(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **DENSE))
    decoder = engine.enable_fast_decode(model, 64, compile=False)
    tensors = adapter_weights(DENSE)
    model.load_lora(write_adapter(tmp_path / "x", tensors))
    model.load_lora(write_adapter(tmp_path / "y", tensors))
    assert model.decoder is None
    with model.use_lora("x"):
        assert model.active_lora == "x"
        tokens, _ = engine.generate([PROMPT], model, max_tokens=6, eos_id=-1)
    assert model.active_lora is None
    merged_model = engine.load(write_checkpoint(tmp_path / "merged", tiny_config(
        "v3", **DENSE), merged(DENSE, tensors, 2.0)))  # type: ignore[arg-type]
    assert tokens == engine.generate([PROMPT], merged_model, max_tokens=6, eos_id=-1)[0]
    model.unload_lora("x")
    assert model.decoder is None
    model.unload_lora("y")
    assert model.decoder is decoder


def test_linear_layers_are_wrapped_only_while_an_adapter_targets_them(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    model = engine.load(make_checkpoint("native", **MOE))
    tensors = {k: v for k, v in adapter_weights(MOE).items() if ".experts.1." in k}
    model.load_lora(write_adapter(tmp_path / "e1", tensors))
    wrapped = sorted(name for name, m in model.module.named_modules()
                     if isinstance(m, LoRALinear))
    assert wrapped == [f"layers.{i}.feed_forward.experts.1.w{j}" for i in (0, 1)
                       for j in (1, 2, 3)]
    layers: Any = model.module.layers
    assert isinstance(layers[0].feed_forward.experts[0].w1, nn.Linear)
