"""Pixtral: the vision tower against transformers, block-diagonal attention across images,
both checkpoint layouts (with and without the patch merger), and the loader's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import engine
from engine.arch import attention
from engine.arch.vision import rotary_cos_sin_2d
from tests.conftest import CheckpointFactory
from tests.engine.vision_util import hf_greedy, hf_model, hf_pixels, image_prompt, noise_image

ATOL = 1e-4
MERGES = [pytest.param(False, id="pixtral12b"), pytest.param(True, id="patch-merger")]


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def pixels_of(model: engine.Model, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    _, pixels = image_prompt(model, [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
    return [torch.from_numpy(p) for p in pixels]


# ---------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("merge", MERGES)
def test_native_and_hf_layouts_load_to_the_same_weights_and_config(
        make_pixtral: CheckpointFactory, merge: bool) -> None:
    native = engine.load(make_pixtral("native", merge))
    hf = engine.load(make_pixtral("hf", merge))
    assert native.has_vision and hf.has_vision
    assert native.config.vision == hf.config.vision
    vision = native.config.vision
    assert vision is not None
    assert (vision.patch_size, vision.spatial_merge_size, vision.pre_norm,
            vision.adapter_bias) == ((14, 2, True, False) if merge else (16, 1, False, True))
    sa, sb = native.module.state_dict(), hf.module.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("merge", MERGES)
def test_folders_saved_by_transformers_load_to_the_same_weights(
        make_pixtral: CheckpointFactory, tmp_path: Path, merge: bool) -> None:
    """What transformers saves loads back to the same weights; so do the names that
    transformers 4.52-4.57 saved (`model.language_model.*`, `model.vision_tower.*`,
    `model.multi_modal_projector.*`, `lm_head`) rather than the Hub's."""
    folder = make_pixtral("hf", merge)
    ours = engine.load(folder).module.state_dict()
    saved = tmp_path / "saved"
    hf_model(folder).save_pretrained(saved)
    shutil.copy(folder / "tekken.json", saved)
    renamed = copy(folder, tmp_path)
    tensors = load_file(renamed / "model.safetensors")
    moves = (("language_model.model.", "model.language_model."),
             ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
             ("multi_modal_projector.", "model.multi_modal_projector."))
    new_names = {}
    for name, tensor in tensors.items():
        for old, new in moves:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        new_names[name] = tensor
    assert "model.vision_tower.ln_pre.weight" in new_names
    save_file(new_names, renamed / "model.safetensors")
    for other in (saved, renamed):
        theirs = engine.load(other).module.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------------------------
# The tower against transformers


@pytest.mark.parametrize("merge", MERGES)
def test_image_features_match_transformers_for_two_images_of_different_sizes(
        make_pixtral: CheckpointFactory, merge: bool) -> None:
    model = engine.load(make_pixtral("native", merge))
    reference = hf_model(make_pixtral("hf", merge))
    pixels = pixels_of(model, [(90, 60), (33, 47)])
    got = model.encode_images(pixels)
    with torch.no_grad():
        inputs = hf_pixels([p.numpy() for p in pixels])
        want = reference.model.get_image_features(**inputs, vision_feature_layer=-1,
                                                  **({} if merge else {
                                                      "vision_feature_select_strategy": "full"}))
    for g, w in zip(got, want.pooler_output, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    side = 28 if merge else 16  # pixels per [IMG] token
    assert [g.shape[0] for g in got] == [
        (p.shape[1] // side) * (p.shape[2] // side) for p in pixels]


def test_2d_rotary_turns_even_frequencies_with_the_row_and_odd_ones_with_the_column() -> None:
    cos, sin = rotary_cos_sin_2d([(2, 3)], head_dim=8, theta=100.0, dtype=torch.float64,
                                 device=torch.device("cpu"))
    f = [100.0 ** (-i / 8) for i in (0, 2, 4, 6)]  # the 1-D frequencies
    # patch (row 1, column 2) is the sixth, row-major; pairs: (row f0, row f2, col f1, col f3)
    want = torch.tensor([1 * f[0], 1 * f[2], 2 * f[1], 2 * f[3]], dtype=torch.float64)
    assert cos.shape == (6, 1, 8)
    torch.testing.assert_close(cos[5, 0], want.cos().repeat_interleave(2))
    torch.testing.assert_close(sin[5, 0, 1::2], want.sin())
    torch.testing.assert_close(sin[5, 0, 0::2], -want.sin())


# ---------------------------------------------------------------------------------------------
# Block-diagonal attention


@pytest.mark.parametrize("merge", MERGES)
def test_two_images_encoded_together_equal_each_encoded_alone(
        make_pixtral: CheckpointFactory, merge: bool) -> None:
    model = engine.load(make_pixtral("native", merge))
    pixels = pixels_of(model, [(120, 80), (40, 64), (64, 40)])
    together = model.encode_images(pixels)
    for p, t in zip(pixels, together, strict=True):
        torch.testing.assert_close(model.encode_images([p])[0], t, atol=1e-5, rtol=0)


def test_without_the_block_diagonal_mask_patches_would_see_the_other_image(
        make_pixtral: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: attention across images (mistral-inference's bug) changes the
    features, so the equality there is the mask's doing."""
    model = engine.load(make_pixtral("native"))
    pixels = pixels_of(model, [(120, 80), (40, 64)])
    masked = model.encode_images(pixels)
    real = attention.block_diagonal_attention
    monkeypatch.setattr("engine.arch.vision.block_diagonal_attention",
                        lambda q, k, v, seqlens: real(q, k, v, [sum(seqlens)]))
    leaky = model.encode_images(pixels)
    assert (leaky[0] - masked[0]).abs().max() > 1e-2


def test_block_diagonal_attention_equals_one_attention_per_sequence() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    out = attention.block_diagonal_attention(q, k, v, [3, 7])
    scale = 8 ** -0.5
    for lo, hi in ((0, 3), (3, 10)):
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) * scale
        want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[lo:hi])
        torch.testing.assert_close(out[lo:hi], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"sequence lengths \[3, 6\] do not add up to 10"):
        attention.block_diagonal_attention(q, k, v, [3, 6])
    assert not attention.uses_xformers(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Loader checks


def _edit_params(folder: Path, **changes: object) -> None:
    params = json.loads((folder / "params.json").read_text())
    params["vision_encoder"].update(changes)
    (folder / "params.json").write_text(json.dumps(params))


def test_a_tokenizer_that_cuts_images_otherwise_is_refused_at_load(
        make_pixtral: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_pixtral("native"), tmp_path)
    tekken = json.loads((folder / "tekken.json").read_text())
    tekken["image"]["image_patch_size"] = 14
    (folder / "tekken.json").write_text(json.dumps(tekken))
    with pytest.raises(engine.ModelLoadError, match=(
            r"tekken.json: the tokenizer cuts images into patches of 14 pixels, merged 1x1, "
            r"with \[IMG\] id 10; the vision encoder expects 16, 1x1 and id 10")):
        engine.load(folder)


def test_a_tokenizer_without_image_settings_is_refused_for_a_vision_model(
        make_pixtral: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_pixtral("native"), tmp_path)
    tekken = json.loads((folder / "tekken.json").read_text())
    del tekken["image"]
    (folder / "tekken.json").write_text(json.dumps(tekken))
    with pytest.raises(engine.ModelLoadError, match="the tokenizer has no image settings"):
        engine.load(folder)


def test_an_unknown_projector_and_a_missing_vision_field_are_named(
        make_pixtral: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_pixtral("native"), tmp_path)
    _edit_params(folder, mm_projector_id="mlp_fancy")
    with pytest.raises(engine.ModelLoadError,
                       match="vision_encoder.mm_projector_id 'mlp_fancy' is not supported"):
        engine.load(folder)
    params = json.loads((folder / "params.json").read_text())
    del params["vision_encoder"]["mm_projector_id"]
    del params["vision_encoder"]["patch_size"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(engine.ModelLoadError,
                       match="missing required field 'vision_encoder.patch_size'"):
        engine.load(folder)


def test_more_vision_layers_than_stored_are_refused_before_anything_is_built(
        make_pixtral: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_pixtral("native"), tmp_path)
    _edit_params(folder, num_hidden_layers=10**9)
    with pytest.raises(engine.ModelLoadError, match=(
            "vision_encoder.num_hidden_layers is 1000000000, but consolidated.safetensors holds "
            "the weights of 2 vision encoder layers")):
        engine.load(folder)


def test_hf_options_we_do_not_implement_are_refused_by_name(
        make_pixtral: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_pixtral("hf"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_layer"] = -2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(engine.ModelLoadError, match=r"vision_feature_layer=-2 is not supported"):
        engine.load(folder)
    config["vision_feature_layer"] = -1
    config["vision_config"]["model_type"] = "clip_vision_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(engine.ModelLoadError,
                       match="vision tower 'clip_vision_model' is not supported"):
        engine.load(folder)


def test_a_missing_vision_tensor_is_named_as_stored(make_pixtral: CheckpointFactory,
                                                    tmp_path: Path) -> None:
    for layout, file, name in (
            ("native", "consolidated.safetensors", "vision_encoder.ln_pre.weight"),
            ("hf", "model.safetensors", "vision_tower.ln_pre.weight")):
        folder = copy(make_pixtral(layout), tmp_path / layout)
        tensors = load_file(folder / file)
        del tensors[name]
        save_file(tensors, folder / file)
        with pytest.raises(engine.ModelLoadError, match=f"missing tensor '{name}'"):
            engine.load(folder)


# ---------------------------------------------------------------------------------------------
# Generation with images against transformers


_loaded: dict[Path, engine.Model] = {}
_references: dict[Path, object] = {}


def ours(folder: Path) -> engine.Model:
    if folder not in _loaded:
        _loaded[folder] = engine.load(folder)
    return _loaded[folder]


def theirs(folder: Path) -> transformers.PreTrainedModel:
    if folder not in _references:
        _references[folder] = hf_model(folder)
    return _references[folder]  # type: ignore[return-value]


ONE = [(90, 60)]
TWO = [(120, 80), (33, 47)]  # different sizes, neither a multiple of the patch size


@pytest.mark.parametrize("layout", ["native", "hf"])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("sizes", [ONE, TWO], ids=["one-image", "two-images"])
def test_greedy_tokens_and_logprobs_match_transformers(
        make_pixtral: CheckpointFactory, layout: str, merge: bool,
        sizes: list[tuple[int, int]]) -> None:
    model = ours(make_pixtral(layout, merge))
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    prompt, pixels = image_prompt(model, images)
    want_tokens, want_logprobs = hf_greedy(theirs(make_pixtral("hf", merge)), prompt, pixels, 8)
    tokens, logprobs = engine.generate([prompt], model, max_tokens=8, eos_id=-1,
                                       images=[images])
    assert tokens[0] == want_tokens
    assert logprobs[0] == pytest.approx(want_logprobs, abs=ATOL)


@pytest.mark.parametrize("merge", MERGES)
def test_a_batch_of_prompts_with_different_images_matches_transformers_per_prompt(
        make_pixtral: CheckpointFactory, merge: bool) -> None:
    """Two images, one image, none: unequal lengths, prefilled in chunks of 7 that cut through
    the image tokens."""
    model = ours(make_pixtral("native", merge))
    reference = theirs(make_pixtral("hf", merge))
    batch = [[noise_image(w, h, seed=10 + i) for i, (w, h) in enumerate(TWO)],
             [noise_image(64, 64, seed=20)], []]
    prompts, pixels = zip(*(image_prompt(model, images, text="Describe.") for images in batch),
                          strict=True)
    tokens, logprobs = engine.generate(list(prompts), model, max_tokens=6, eos_id=-1,
                                       chunk_size=7, images=batch)
    for i, (prompt, p) in enumerate(zip(prompts, pixels, strict=True)):
        want_tokens, want_logprobs = hf_greedy(reference, prompt, p, 6)
        assert tokens[i] == want_tokens, i
        assert logprobs[i] == pytest.approx(want_logprobs, abs=ATOL)


def test_stream_gives_the_tokens_of_generate(make_pixtral: CheckpointFactory) -> None:
    model = ours(make_pixtral("native"))
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(TWO)]
    prompt, _ = image_prompt(model, images)
    want, _ = engine.generate([prompt], model, max_tokens=6, eos_id=-1, images=[images])
    events = list(engine.stream(prompt, model, engine.SamplingParams(max_tokens=6),
                                eos_id=-1, images=images))
    assert [e.token for e in events if isinstance(e, engine.TokenEvent)] == want[0]


def test_the_image_changes_the_answer(make_pixtral: CheckpointFactory) -> None:
    """Guards the parity tests: features really replace the [IMG] embeddings."""
    model = ours(make_pixtral("native"))
    a, b = noise_image(64, 64, seed=1), noise_image(64, 64, seed=2)
    prompt, _ = image_prompt(model, [a])
    _, with_a = engine.generate([prompt], model, max_tokens=1, eos_id=-1, images=[[a]])
    _, with_b = engine.generate([prompt], model, max_tokens=1, eos_id=-1, images=[[b]])
    assert abs(with_a[0][0] - with_b[0][0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Prompts and images that disagree


def test_an_image_count_that_does_not_match_the_img_tokens_says_both_numbers(
        make_pixtral: CheckpointFactory) -> None:
    model = ours(make_pixtral("native"))
    small, large = noise_image(32, 32), noise_image(64, 48)
    prompt, _ = image_prompt(model, [small])  # 2x2 patches
    with pytest.raises(engine.GenerationError) as e:
        engine.generate([prompt], model, max_tokens=1, images=[[large]])
    assert str(e.value).startswith(
        "prompt 0 has 4 [IMG] tokens but its 1 image(s) make 12 patches")
    with pytest.raises(engine.GenerationError, match=(
            r"prompt 0 has 4 \[IMG\] tokens but its 0 image\(s\) make 0 patches")):
        engine.generate([prompt], model, max_tokens=1)


def test_images_in_the_wrong_order_are_refused(make_pixtral: CheckpointFactory) -> None:
    model = ours(make_pixtral("native"))
    wide, tall = noise_image(64, 32), noise_image(32, 64)  # 4x2 and 2x4 patches: 8 each
    prompt, _ = image_prompt(model, [wide, tall])
    with pytest.raises(engine.GenerationError) as e:
        engine.generate([prompt], model, max_tokens=1, images=[[tall, wide]])
    assert str(e.value) == ("image 0 of prompt 0 is 2x4 patches, but its place in the prompt "
                            "holds tokens for 4x2 patches: pass the images in the order of their "
                            "tokens")


def test_images_for_a_model_without_vision_are_refused(
        make_checkpoint: CheckpointFactory) -> None:
    model = engine.load(make_checkpoint("native", tokenizer="tekken"))
    with pytest.raises(engine.GenerationError,
                       match="this model has no vision encoder: images are not supported"):
        engine.generate([[1, 10, 13, 5]], model, max_tokens=1, images=[[noise_image(32, 32)]])
    # without images, [IMG] is just a token of a text model
    assert len(engine.generate([[1, 10, 13, 5]], model, max_tokens=1, eos_id=-1)[0][0]) == 1


def test_image_limits_apply_and_the_caller_can_change_them(
        make_pixtral: CheckpointFactory) -> None:
    model = ours(make_pixtral("native"))
    image = noise_image(64, 48)
    prompt, _ = image_prompt(model, [image])
    with pytest.raises(engine.ImageError, match=(
            r"image 0 of prompt 0: the image is 64x48 pixels \(3,072 pixels\), over the limit "
            r"of 3,000 pixels")):
        engine.generate([prompt], model, max_tokens=1, images=[[image]],
                        image_limits=engine.ImageLimits(max_pixels=3000))
    many = [noise_image(32, 32, seed=i) for i in range(3)]
    prompt, _ = image_prompt(model, many)
    with pytest.raises(engine.ImageError,
                       match="prompt 0 has 3 images; at most 2 per conversation"):
        engine.generate([prompt], model, max_tokens=1, images=[many],
                        image_limits=engine.ImageLimits(max_images_per_conversation=2))
    assert len(engine.generate([prompt], model, max_tokens=1, eos_id=-1, images=[many])[0][0]) == 1


# ---------------------------------------------------------------------------------------------
# The prefix cache and images


def test_the_prefix_cache_never_reuses_another_images_keys_and_values(
        make_pixtral: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two screenshots of the same size: same token ids, different pixels. The second request
    reuses the text before the image, not the image; the same image again is reused whole
    (and not encoded again)."""
    model = ours(make_pixtral("native"))
    first, second = noise_image(64, 48, seed=1), noise_image(64, 48, seed=2)
    prompt, _ = image_prompt(model, [first])
    assert image_prompt(model, [second])[0] == prompt
    encoded: list[int] = []
    real = engine.Model.encode_images
    monkeypatch.setattr(engine.Model, "encode_images",
                        lambda self, pixels: encoded.append(len(pixels)) or real(self, pixels))
    cache = engine.PrefixCache(model, max_seq_len=256, budget_bytes=64 << 20)
    sampling = engine.SamplingParams(max_tokens=4)

    def run(image: Image.Image) -> tuple[list[float], engine.EndEvent]:
        events = list(engine.stream(prompt, model, sampling, eos_id=-1, prefix_cache=cache,
                                    cache_key="chat", images=[image]))
        end = events[-1]
        assert isinstance(end, engine.EndEvent)
        return [e.logprob for e in events if isinstance(e, engine.TokenEvent)], end

    run(first)
    logprobs, end = run(second)
    first_img = prompt.index(10)
    assert end.cached_tokens == first_img  # the text before the image, nothing of it
    _, fresh = engine.generate([prompt], model, max_tokens=4, eos_id=-1, images=[[second]])
    assert logprobs == pytest.approx(fresh[0], abs=ATOL)
    assert encoded == [1, 1, 1]
    again, end = run(second)
    assert end.cached_tokens == len(prompt) - 1
    assert again == pytest.approx(fresh[0], abs=ATOL)
    assert encoded == [1, 1, 1]  # the third request needed no image features


def test_encoding_the_images_is_a_streams_first_unit_of_work(
        make_pixtral: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler stepping streams can run other work between the encoder and the prefill."""
    model = ours(make_pixtral("native"))
    image = noise_image(64, 48)
    prompt, _ = image_prompt(model, [image])
    calls: list[str] = []
    encode, forward = engine.Model.encode_images, engine.Model.forward
    monkeypatch.setattr(engine.Model, "encode_images",
                        lambda self, pixels: calls.append("encode") or encode(self, pixels))
    monkeypatch.setattr(engine.Model, "forward",
                        lambda self, *a, **k: calls.append("forward") or forward(self, *a, **k))
    run = engine.stream(prompt, model, engine.SamplingParams(max_tokens=2), images=[image],
                        chunk_size=16)
    assert calls == []  # the images are checked, not encoded, when the stream is made
    assert run.step() == [] and calls == ["encode"]
    assert run.step() == [] and calls == ["encode", "forward"]
    events = list(run)
    assert isinstance(events[-1], engine.EndEvent) and calls.count("encode") == 1
