"""Mamba2 (Codestral Mamba) on tiny random checkpoints: parity with transformers'
`Mamba2ForCausalLM` (torch path, float32), and the invariants of a recurrent state: decoding
equals a scan of the finished sequence, chunking and batching change nothing, a checkpoint
continues exactly, memory is constant, padding leaves a row's state untouched."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import engine
from engine import cli
from engine.arch.config import MambaConfig
from engine.arch.mamba2 import ssd_scan, ssm_step
from engine.arch.recurrent import MambaCache
from engine.checkpoints.mamba2 import from_params as mamba_from_params
from engine.checkpoints.tiny import make_tiny, tiny_mamba_config

ATOL = 1e-4
LONG = [1, *[(i * 7919) % 30000 + 100 for i in range(49)]]  # 50 tokens: 4 scan chunks of 16
PROMPTS = [LONG, [1, 9, 25, 400, 7, 12345], [1, *range(900, 917)]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights (seed 0) in both layouts."""
    root = tmp_path_factory.mktemp("mamba")
    return {layout: make_tiny(root / layout, layout=layout, arch="mamba")
            for layout in ("native", "hf")}


@pytest.fixture(scope="module")
def model(folders: dict[str, Path]) -> engine.Model:
    return engine.load(folders["native"])


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folders["hf"],
                                                             dtype=torch.float32).eval()


def hf_greedy(ref: transformers.PreTrainedModel, prompt: list[int],
              n: int) -> tuple[list[int], list[float]]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, output_scores=True, return_dict_in_generate=True,
                       pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item()
                for s, t in zip(out.scores, tokens, strict=True)]
    return tokens, logprobs


def full_logits(model: engine.Model, sequence: list[int]) -> torch.Tensor:
    """Logits at every position of one scan over the whole sequence: (T, V)."""
    cache = model.new_cache(1, len(sequence))
    with torch.inference_mode():
        return model.forward(torch.tensor([sequence]), torch.arange(len(sequence))[None],
                             cache)[0]


# ---------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.fixture(scope="module")
def reference_greedy(reference: transformers.PreTrainedModel,
                     ) -> list[tuple[list[int], list[float]]]:
    return [hf_greedy(reference, prompt, 12) for prompt in PROMPTS[:2]]


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_greedy_tokens_and_logprobs_match_transformers(
        folders: dict[str, Path], reference_greedy: list[tuple[list[int], list[float]]],
        layout: str) -> None:
    model = engine.load(folders[layout])
    assert isinstance(model.config, MambaConfig)
    for prompt, (want_tokens, want_logprobs) in zip(PROMPTS[:2], reference_greedy, strict=True):
        tokens, logprobs = engine.generate([prompt], model, max_tokens=12, eos_id=-1)
        assert tokens[0] == want_tokens
        assert logprobs[0] == pytest.approx(want_logprobs, abs=ATOL)


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_every_position_of_a_multi_chunk_prompt_matches_transformers(
        folders: dict[str, Path], reference: transformers.PreTrainedModel, layout: str) -> None:
    model = engine.load(folders[layout])
    assert model.config.chunk_size == 16 and len(LONG) == 50  # type: ignore[union-attr]
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([LONG])).logits[0].float(), -1)
    got = torch.log_softmax(full_logits(model, LONG), -1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_padded_tied_vocabulary_matches_transformers_on_the_real_columns(
        tmp_path: Path) -> None:
    """pad_vocab_size_multiple 48: 32784 embedding rows for the tokenizer's 32768; tied head."""
    native = make_tiny(tmp_path / "native", arch="mamba", seed=3, pad_vocab_size_multiple=48,
                       tie_embeddings=True)
    hf = make_tiny(tmp_path / "hf", layout="hf", arch="mamba", seed=3,
                   pad_vocab_size_multiple=48, tie_embeddings=True)
    assert "model.lm_head.weight" not in load_file(native / "consolidated.safetensors")
    assert load_file(hf / "model.safetensors")["backbone.embeddings.weight"].shape[0] == 32784
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    model = engine.load(native)
    with torch.no_grad():
        want = ref(torch.tensor([LONG])).logits[0, :, :32768].float()
    got = full_logits(model, LONG)
    assert got.shape == (50, 32768)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Invariants of the recurrent state


def test_recurrent_decoding_equals_a_scan_of_the_finished_sequence(model: engine.Model) -> None:
    tokens, logprobs = engine.generate([LONG], model, max_tokens=20, eos_id=-1)
    sequence = LONG + tokens[0]
    scan = torch.log_softmax(full_logits(model, sequence), -1)
    want = [scan[len(LONG) - 1 + i, t].item() for i, t in enumerate(tokens[0])]
    assert logprobs[0] == pytest.approx(want, abs=ATOL)


@pytest.mark.parametrize("chunk", [1, 3, 16, 17, 1000])
def test_chunked_prefill_equals_one_shot(model: engine.Model, chunk: int) -> None:
    one_shot = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1)
    chunked = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1, chunk_size=chunk)
    assert chunked[0] == one_shot[0]
    for got, want in zip(chunked[1], one_shot[1], strict=True):
        assert got == pytest.approx(want, abs=ATOL)


def test_batch_of_unequal_prompts_equals_each_prompt_alone(model: engine.Model) -> None:
    batch_tokens, batch_logprobs = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1)
    for i, prompt in enumerate(PROMPTS):
        tokens, logprobs = engine.generate([prompt], model, max_tokens=8, eos_id=-1)
        assert batch_tokens[i] == tokens[0]
        assert batch_logprobs[i] == pytest.approx(logprobs[0], abs=ATOL)


def test_a_row_stopped_at_eos_lets_the_others_go_on(model: engine.Model) -> None:
    free, _ = engine.generate(PROMPTS, model, max_tokens=10, eos_id=-1)
    eos = free[1][3]
    tokens, _ = engine.generate(PROMPTS, model, max_tokens=10, eos_id=eos)
    for i in range(3):
        assert tokens[i] == (free[i][: free[i].index(eos)] if eos in free[i] else free[i])


def test_padding_leaves_a_rows_state_exactly_unchanged(model: engine.Model) -> None:
    cache = model.new_cache(2, 64)
    assert isinstance(cache, MambaCache)
    with torch.inference_mode():
        model.forward(torch.tensor([LONG[:20], LONG[20:40]]),
                      torch.tensor([list(range(20)), [*range(10), *[-1] * 10]]), cache)
        before = (cache.conv[:, 1].clone(), cache.ssm[:, 1].clone())
        model.forward(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[20, 21], [-1, -1]]), cache)
        model.forward(torch.tensor([[9], [10]]), torch.tensor([[22], [-1]]), cache)
    assert torch.equal(cache.conv[:, 1], before[0]) and torch.equal(cache.ssm[:, 1], before[1])
    assert cache.lengths.tolist() == [23, 10]
    # The convolution keeps the last d_conv - 1 real inputs of the row, not the padding's.
    ref = model.new_cache(1, 64)
    with torch.inference_mode():
        model.forward(torch.tensor([LONG[20:30]]), torch.arange(10)[None], ref)
    torch.testing.assert_close(cache.conv[:, 1], ref.conv[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.ssm[:, 1], ref.ssm[:, 0], atol=1e-5, rtol=0)


def test_checkpoint_then_restore_continues_exactly_like_a_fresh_run(
        model: engine.Model) -> None:
    old, extension = LONG[:30], LONG[30:]
    cache = model.new_cache(1, 64)
    assert isinstance(cache, MambaCache)
    with torch.inference_mode():
        model.forward(torch.tensor([old]), torch.arange(30)[None], cache)
        cache.checkpoint()
        # The first request goes on decoding: the state moves past the prompt ...
        model.forward(torch.tensor([[77, 78, 79]]), torch.arange(30, 33)[None], cache)
        # ... and the next prompt extends the old one: back to the checkpoint, prefill the rest.
        cache.restore()
        assert cache.lengths.tolist() == [30]
        got = model.forward(torch.tensor([extension]), torch.arange(30, 50)[None], cache)
    torch.testing.assert_close(got[0], full_logits(model, LONG)[30:], atol=ATOL, rtol=0)
    # keep(n) is the same through the prefix cache's interface.
    assert cache.keep(50) == 50 and cache.lengths.tolist() == [50]
    assert cache.keep(30) == 30 and cache.lengths.tolist() == [30]
    assert cache.keep(29) == 0 and cache.lengths.tolist() == [0]
    assert not cache.ssm.any() and not cache.conv.any()
    # A new checkpoint reuses the memory of the previous one.
    first = cache.snapshot
    assert first is not None and cache.checkpoint().ssm.data_ptr() == first.ssm.data_ptr()
    assert cache.snapshot.lengths.tolist() == [0]


def test_prefix_cache_continues_a_document_from_the_end_of_its_last_prompt(
        model: engine.Model) -> None:
    cache = engine.PrefixCache(model, max_seq_len=256, budget_bytes=2**20)
    sampling = engine.SamplingParams(max_tokens=6)
    first = list(engine.stream(LONG[:30], model, sampling, eos_id=-1, prefix_cache=cache,
                               cache_key="doc"))
    second = list(engine.stream(LONG, model, sampling, eos_id=-1, prefix_cache=cache,
                                cache_key="doc"))
    fresh = list(engine.stream(LONG, model, sampling, eos_id=-1))
    # The snapshot is taken before the prompt's last token: 29 reused, 21 prefilled, 5 fed back.
    assert (first[-1].cached_tokens, second[-1].cached_tokens) == (0, 29)  # type: ignore[union-attr]
    assert second[-1].computed_tokens == 21 + 5  # type: ignore[union-attr]
    again = list(engine.stream(LONG, model, sampling, eos_id=-1, prefix_cache=cache,
                               cache_key="doc"))
    assert again[-1].cached_tokens == len(LONG) - 1  # type: ignore[union-attr]
    assert [e.token for e in again[:-1]] == [e.token for e in fresh[:-1]]  # type: ignore[union-attr]
    assert [e.token for e in second[:-1]] == [e.token for e in fresh[:-1]]  # type: ignore[union-attr]
    assert [e.logprob for e in second[:-1]] == pytest.approx(  # type: ignore[union-attr]
        [e.logprob for e in fresh[:-1]], abs=ATOL)  # type: ignore[union-attr]


def test_restore_without_checkpoint_and_positions_that_skip_are_refused(
        model: engine.Model) -> None:
    cache = model.new_cache(1, 64)
    assert isinstance(cache, MambaCache)
    with pytest.raises(ValueError, match=r"^restore\(\) without a checkpoint: call "
                       r"checkpoint\(\) first$"):
        cache.restore()
    with torch.inference_mode():
        model.forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
        with pytest.raises(ValueError, match=r"^row 0: positions \[0\] do not continue its "
                           r"recurrent state, which holds 3 tokens \(expected consecutive "
                           r"positions from there, padding only at the end\)$"):
            model.forward(torch.tensor([[4]]), torch.tensor([[0]]), cache)
        with pytest.raises(ValueError, match=r"positions \[-1, 3\] do not continue"):
            model.forward(torch.tensor([[4, 5]]), torch.tensor([[-1, 3]]), cache)


def test_state_memory_is_constant_whatever_the_length(model: engine.Model) -> None:
    config = model.config
    assert isinstance(config, MambaConfig)
    # Per layer: conv (192 channels x 3 inputs) + SSM (8 heads x 16 x 16), both float32 here.
    per_layer = (192 * 3 + 8 * 16 * 16) * 4
    assert (config.conv_dim, config.d_conv, config.n_heads, config.head_dim,
            config.d_state) == (192, 4, 8, 16, 16)
    short, long = model.new_cache(1, 16), model.new_cache(1, 1_000_000)
    assert short.nbytes() == long.nbytes() == 2 * per_layer
    with torch.inference_mode():
        model.forward(torch.tensor([LONG * 8]), torch.arange(400)[None], long)
    assert long.nbytes() == 2 * per_layer


def test_chunked_scan_equals_the_recurrence_step_by_step() -> None:
    gen = torch.Generator().manual_seed(1)
    bsz, seqlen, heads, p, groups, n = 2, 23, 4, 3, 2, 5
    x = torch.randn(bsz, seqlen, heads, p, generator=gen)
    dt = torch.rand(bsz, seqlen, heads, generator=gen)
    dt[1, 15:] = 0.0  # padding: the state must be the one after token 14
    a_neg = -torch.rand(heads, generator=gen) * 8
    b = torch.randn(bsz, seqlen, groups, n, generator=gen)
    c = torch.randn(bsz, seqlen, groups, n, generator=gen)
    state0 = torch.randn(bsz, heads, p, n, generator=gen)
    state, ys = state0.clone(), []
    for t in range(seqlen):
        ys.append(ssm_step(x[:, t], dt[:, t], a_neg, b[:, t], c[:, t], state))  # in place
        if t == 14:
            after_14 = state[1].clone()
    for chunk in (1, 4, 8, 23, 64):
        y_scan, final = ssd_scan(x, dt, a_neg, b, c, state0, chunk)
        torch.testing.assert_close(y_scan, torch.stack(ys, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[1], after_14, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# End to end, dtypes, tools


def test_fim_prompt_streams_end_to_end_like_generate(model: engine.Model) -> None:
    prompt = engine.encode_fim(model.tokenizer, "def add(a, b):\n    ", "\n\nprint(add(1, 2))")
    assert prompt[:2] == [1, 13]  # v3: [BOS] [SUFFIX] suffix [PREFIX] prefix
    assert 11 in prompt
    events = list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=10),
                                eos_id=-1))
    tokens, logprobs = engine.generate([prompt], model, max_tokens=10, eos_id=-1)
    assert [e.token for e in events[:-1]] == tokens[0]  # type: ignore[union-attr]
    assert [e.logprob for e in events[:-1]] == pytest.approx(logprobs[0], abs=1e-6)  # type: ignore[union-attr]
    end = events[-1]
    assert isinstance(end, engine.EndEvent)
    assert (end.reason, end.prompt_tokens, end.generated_tokens) == ("length", len(prompt), 10)
    text = "".join(e.text for e in events[:-1]) + end.text  # type: ignore[union-attr]
    assert text == model.tokenizer.decode(tokens[0])


def test_bfloat16_keeps_per_head_parameters_and_state_in_float32(
        folders: dict[str, Path]) -> None:
    model = engine.load(folders["native"], dtype="bfloat16")
    mixer = model.module.backbone.layers[0].mixer  # type: ignore[union-attr, index]
    assert (model.dtype, mixer.in_proj.weight.dtype, mixer.A_log.dtype, mixer.D.dtype,
            mixer.dt_bias.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32,
                                     torch.float32, torch.float32)
    cache = model.new_cache(1, 8)
    assert (cache.conv.dtype, cache.ssm.dtype) == (torch.bfloat16, torch.float32)  # type: ignore[union-attr]
    tokens, logprobs = engine.generate([LONG], model, max_tokens=4, eos_id=-1)
    assert len(tokens[0]) == 4 and all(math.isfinite(lp) for lp in logprobs[0])


def test_make_tiny_arch_mamba_writes_a_native_codestral_mamba_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "tiny"
    assert cli.main(["make-tiny", str(folder), "--arch", "mamba", "--dim", "32",
                     "--layers", "1"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        f"wrote a tiny Mamba2 checkpoint (native layout, v3 tokenizer) to {folder}")
    params = json.loads((folder / "params.json").read_text())
    assert params == {"model_type": "mamba", "dim": 32, "n_layers": 1, "vocab_size": 32768,
                      "n_groups": 2, "rms_norm": True, "residual_in_fp32": True,
                      "fused_add_norm": True, "pad_vocab_size_multiple": 1,
                      "tie_embeddings": False, "d_state": 16, "headdim": 16, "chunk_size": 16}
    keys = set(load_file(folder / "consolidated.safetensors"))
    assert keys == {"model.backbone.embedding.weight", "model.backbone.norm_f.weight",
                    "model.lm_head.weight", "model.backbone.layers.0.norm.weight",
                    *(f"model.backbone.layers.0.mixer.{k}" for k in (
                        "in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log",
                        "D", "norm.weight", "out_proj.weight"))}
    assert engine.load(folder).config == tiny_mamba_config(dim=32, n_layers=1)
    capsys.readouterr()
    assert cli.main(["make-tiny", str(tmp_path / "t2"), "--arch", "mamba", "--heads", "4"]) == 2
    assert capsys.readouterr().err == ("tramontane: error: --arch mamba takes only --dim and "
                                       "--layers, not --heads\n")


# ---------------------------------------------------------------------------------------------
# Loading errors


def _edited_copy(src: Path, dst: Path, *, params: dict[str, object] | None = None,
                 drop: str | None = None, replace: tuple[str, torch.Tensor] | None = None,
                 config_name: str = "params.json") -> Path:
    shutil.copytree(src, dst)
    if params is not None:
        data = json.loads((dst / config_name).read_text())
        data.update(params)
        (dst / config_name).write_text(json.dumps(data))
    if drop or replace:
        weights = next(dst.glob("*.safetensors"))
        state = load_file(weights)
        if drop:
            del state[drop]
        if replace:
            state[replace[0]] = replace[1]
        save_file(state, str(weights))
    return dst


def test_codestral_mamba_params_get_the_reference_layer_hyper_parameters(
        tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text(json.dumps({
        "dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
        "tie_embeddings": False, "model_type": "mamba"}))
    config = mamba_from_params(path)
    assert (config.d_state, config.d_conv, config.expand, config.head_dim, config.chunk_size,
            config.norm_eps, config.dt_limit) == (128, 4, 2, 64, 256, 1e-5, (0.0, math.inf))
    assert (config.d_inner, config.n_heads, config.conv_dim, config.padded_vocab_size) == (
        8192, 128, 8192 + 2 * 8 * 128, 32768)
    assert config.max_position_embeddings is None
    # Its whole state, per document: 260 MiB (bfloat16 convolution inputs, float32 SSM).
    state = MambaCache(config, 1, 10**6, device="meta", dtype=torch.bfloat16)
    assert state.nbytes() == 64 * (10240 * 3 * 2 + 128 * 64 * 128 * 4)
    assert round(state.nbytes() / 2**20, 2) == 259.75


def test_loading_errors_name_the_file_and_the_problem(folders: dict[str, Path],
                                                      tmp_path: Path) -> None:
    native, hf = folders["native"], folders["hf"]
    weights = "consolidated.safetensors"
    cases: list[tuple[Path, str]] = [
        (_edited_copy(native, tmp_path / "a", drop="model.backbone.layers.1.mixer.D"),
         f"{tmp_path / 'a' / weights}: missing tensor 'model.backbone.layers.1.mixer.D'"),
        (_edited_copy(native, tmp_path / "b",
                      replace=("model.backbone.layers.0.mixer.A_log", torch.zeros(7))),
         f"{tmp_path / 'b' / weights}: tensor 'model.backbone.layers.0.mixer.A_log' has shape "
         "[7], the config implies [8]"),
        (_edited_copy(native, tmp_path / "c", replace=("model.backbone.extra", torch.zeros(1))),
         f"{tmp_path / 'c' / weights}: unexpected tensor 'model.backbone.extra' (not a Mamba2 "
         "weight)"),
        (_edited_copy(native, tmp_path / "d", replace=("lm_head.weight", torch.zeros(1))),
         f"{tmp_path / 'd' / weights}: unexpected tensor 'lm_head.weight' (not a Mamba2 "
         "weight)"),
        (_edited_copy(native, tmp_path / "e", params={"rms_norm": False}),
         f"{tmp_path / 'e' / 'params.json'}: rms_norm: false (LayerNorm) is not supported; "
         "Mamba2 checkpoints use RMSNorm"),
        (_edited_copy(native, tmp_path / "f", params={"n_groups": 3}),
         f"{tmp_path / 'f' / 'params.json'}: the number of heads (8) must be a multiple of "
         "n_groups (3)"),
        (_edited_copy(hf, tmp_path / "g", params={"use_bias": True}, config_name="config.json"),
         f"{tmp_path / 'g' / 'config.json'}: use_bias=True is not supported (only False, as in "
         "Codestral Mamba)"),
        (_edited_copy(hf, tmp_path / "h", params={"num_heads": 4}, config_name="config.json"),
         f"{tmp_path / 'h' / 'config.json'}: num_heads (4) must be expand * hidden_size / "
         "head_dim (8)"),
        (_edited_copy(hf, tmp_path / "i", drop="lm_head.weight"),
         f"{tmp_path / 'i' / 'model.safetensors'}: missing tensor 'lm_head.weight'"),
    ]
    params = json.loads((native / "params.json").read_text())
    del params["n_groups"]
    (tmp_path / "j").mkdir()
    for name in ("tokenizer.model.v3", weights):  # the headers are read before the config
        shutil.copy(native / name, tmp_path / "j")
    (tmp_path / "j" / "params.json").write_text(json.dumps(params))
    cases.append((tmp_path / "j", f"{tmp_path / 'j' / 'params.json'}: missing required field "
                  "'n_groups'"))
    for folder, message in cases:
        with pytest.raises(engine.ModelLoadError) as info:
            engine.load(folder)
        assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# Config files written by other tools


@pytest.mark.parametrize("spelling", ['{"__float__": "Infinity"}', "Infinity"],
                         ids=["transformers-5.2x", "bare-token"])
def test_time_step_limit_reads_both_spellings_of_infinity(folders: dict[str, Path],
                                                          tmp_path: Path, spelling: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(folders["hf"], folder)
    data = json.loads((folder / "config.json").read_text())
    data["time_step_limit"] = "LIMIT"
    text = json.dumps(data, indent=2).replace('"LIMIT"', f"[0.0, {spelling}]")
    (folder / "config.json").write_text(text)
    assert f'"time_step_limit": [0.0, {spelling}]' in text
    assert engine.load(folder).config.dt_limit == (0.0, math.inf)


def test_a_config_json_saved_by_transformers_loads_like_ours(folders: dict[str, Path],
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(folders["hf"], folder)
    config = transformers.Mamba2Config.from_pretrained(folder)
    (folder / "config.json").unlink()
    config.save_pretrained(folder)
    text = (folder / "config.json").read_text()
    if '"__float__": "Infinity"' not in text:
        pytest.skip(f"transformers {transformers.__version__} writes the bare token")
    assert engine.load(folder).config == engine.load(folders["hf"]).config


@pytest.mark.parametrize("limit", [[0.0], "inf", [0.0, {"__float__": "Huge"}], [0.0, None]])
def test_a_time_step_limit_that_is_no_pair_of_numbers_is_refused(
        folders: dict[str, Path], tmp_path: Path, limit: object) -> None:
    folder = _edited_copy(folders["hf"], tmp_path / "m", params={"time_step_limit": limit},
                          config_name="config.json")
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load(folder)
    assert str(info.value) == (f"{folder / 'config.json'}: time_step_limit must be [low, high], "
                               f"got {limit!r}")
