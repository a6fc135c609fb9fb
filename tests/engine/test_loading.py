"""Checkpoint loading: both layouts, shards, dtypes, config fields, and every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine.arch.config import LEGACY_ROPE_THETA
from tests.conftest import CheckpointFactory


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def same_weights(a: engine.Model, b: engine.Model) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_native_and_hf_layouts_load_to_the_same_weights(make_checkpoint: CheckpointFactory) -> None:
    native = engine.load(make_checkpoint("native"))
    hf = engine.load(make_checkpoint("hf"))
    # the HF config also states a context length, which params.json need not
    assert replace(hf.config, max_position_embeddings=None) == native.config
    assert same_weights(native, hf)


def test_sharded_hf_checkpoint_with_index(make_checkpoint: CheckpointFactory,
                                         tmp_path: Path) -> None:
    folder = copy(make_checkpoint("hf"), tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_weights(engine.load(folder), engine.load(make_checkpoint("native")))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(engine.ModelLoadError, match="listed in model.safetensors.index.json but "
                       "missing"):
        engine.load(folder)


def test_dtype_defaults_to_the_checkpoint_and_can_be_chosen(
        make_checkpoint: CheckpointFactory) -> None:
    assert engine.load(make_checkpoint("native")).dtype == torch.float32
    bf16_folder = make_checkpoint("native", dtype=torch.bfloat16)
    assert engine.load(bf16_folder).dtype == torch.bfloat16
    model = engine.load(make_checkpoint("native"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    tokens, _ = engine.generate([[1, 5, 6, 7]], model, max_tokens=4, eos_id=-1)
    assert len(tokens[0]) == 4
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        engine.load(make_checkpoint("native"), dtype="float8")


def test_params_json_fields(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native", n_layers=4, head_dim=32), tmp_path)
    params = json.loads((folder / "params.json").read_text())
    del params["rope_theta"]
    params["sliding_window"] = [8, None]
    params["unknown_future_field"] = {"x": 1}
    (folder / "params.json").write_text(json.dumps(params))
    config = engine.load(folder).config
    assert config.rope_theta == LEGACY_ROPE_THETA
    assert config.sliding_windows == (8, None, 8, None)
    assert config.head_dim == 32 and config.n_heads * config.head_dim != config.dim
    assert config.extras == {"unknown_future_field": {"x": 1}}


# --- bad input --------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(engine.ModelLoadError, match="model folder not found") as e:
        engine.load(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(engine.ModelLoadError, match="neither params.json"):
        engine.load(tmp_path)


def test_params_not_json(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    (folder / "params.json").write_text("{dim: 64,")
    with pytest.raises(engine.ModelLoadError, match=r"params\.json: not valid JSON"):
        engine.load(folder)


def test_params_missing_field(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    params = json.loads((folder / "params.json").read_text())
    del params["hidden_dim"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(engine.ModelLoadError, match="params.json: missing required field "
                       "'hidden_dim'"):
        engine.load(folder)


def test_params_invalid_value(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    params = json.loads((folder / "params.json").read_text())
    params["n_kv_heads"] = 3
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(engine.ModelLoadError, match=r"n_heads \(4\) must be a multiple of "
                       r"n_kv_heads \(3\)"):
        engine.load(folder)


def test_shape_mismatch_names_the_tensor(make_checkpoint: CheckpointFactory,
                                         tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    params = json.loads((folder / "params.json").read_text())
    params["hidden_dim"] = 100
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(engine.ModelLoadError, match=r"consolidated.safetensors: tensor "
                       r"'layers.0.feed_forward.w1.weight' has shape \[128, 64\], the config "
                       r"implies \[100, 64\]"):
        engine.load(folder)


def test_missing_and_unexpected_tensors(make_checkpoint: CheckpointFactory,
                                        tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    state = load_file(folder / "consolidated.safetensors")
    norm = state.pop("norm.weight")
    save_file(state, str(folder / "consolidated.safetensors"))
    with pytest.raises(engine.ModelLoadError, match="missing tensor 'norm.weight'"):
        engine.load(folder)
    state["norm.weight"] = norm
    state["layers.0.attention.bias"] = norm.clone()
    save_file(state, str(folder / "consolidated.safetensors"))
    with pytest.raises(engine.ModelLoadError, match="unexpected tensor 'layers.0.attention.bias'"):
        engine.load(folder)


def test_truncated_safetensors(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    weights = folder / "consolidated.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(engine.ModelLoadError, match=r"consolidated.safetensors: truncated: its "
                       r"tensors need \d+ bytes, the file has \d+"):
        engine.load(folder)
    weights.write_bytes(data[:100])
    with pytest.raises(engine.ModelLoadError, match="truncated or not a safetensors file"):
        engine.load(folder)


class _Marker:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("name", ["consolidated.pth", "pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused_never_unpickled(make_checkpoint: CheckpointFactory,
                                                        tmp_path: Path, name: str) -> None:
    layout = "native" if name.startswith("consolidated") else "hf"
    folder = copy(make_checkpoint(layout), tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "unpickled"
    (folder / name).write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(engine.ModelLoadError, match="pickle checkpoints are refused"):
        engine.load(folder)
    with pytest.raises(engine.ModelLoadError, match="pickle checkpoints are refused"):
        engine.load(folder / name)
    assert not marker.exists()


def test_missing_tokenizer(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native"), tmp_path)
    (folder / "tokenizer.model.v3").unlink()
    with pytest.raises(engine.ModelLoadError, match="no Mistral tokenizer file"):
        engine.load(folder)


def test_corrupt_tokenizer(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("native", tokenizer="tekken"), tmp_path)
    (folder / "tekken.json").write_text("not json")
    with pytest.raises(engine.ModelLoadError, match="tekken.json: cannot read the tokenizer"):
        engine.load(folder)


def test_unsupported_hf_architecture(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = copy(make_checkpoint("hf"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(engine.ModelLoadError, match="unsupported architecture"):
        engine.load(folder)
