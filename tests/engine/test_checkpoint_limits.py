"""Checkpoints that claim absurd sizes, nest JSON without end, or do not fit in memory: each is
one `ModelLoadError` naming the file and the problem, found before anything large is built."""

from __future__ import annotations

import json
import math
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import engine
from engine import cli
from engine.checkpoints import loading
from engine.checkpoints.files import MAX_SAFETENSORS_HEADER, read_json, read_safetensors_header
from engine.checkpoints.tiny import make_tiny
from tests.conftest import CheckpointFactory

# What a load that stops at the headers may allocate (Python objects, tracemalloc): the config,
# the tensor index, one header, and the tokenizer (~3 MB) where shapes are compared. Building
# what the sizes below claim would take gigabytes (measured: 15-30 KB and 2.7 MB).
SMALL = 8 * 2**20
DEEP = 100_000


def edited(src: Path, dst: Path, config_name: str = "params.json", **fields: object) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / config_name).read_text())
    for key, value in fields.items():
        target = data
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    (dst / config_name).write_text(json.dumps(data))
    return dst


def load_error(folder: Path) -> tuple[str, int]:
    """The message of the `ModelLoadError` that loading `folder` raises, and the peak of the
    Python memory allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(engine.ModelLoadError) as info:
            engine.load(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return str(info.value), peak


@pytest.fixture(scope="module")
def mamba(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mamba")
    return {layout: make_tiny(root / layout, layout=layout, arch="mamba")
            for layout in ("native", "hf")}


# --- counts of layers and experts, against the tensors stored ---------------------------------


def test_a_billion_layers_is_refused_from_the_headers_alone(make_checkpoint: CheckpointFactory,
                                                            tmp_path: Path) -> None:
    folder = edited(make_checkpoint("native"), tmp_path / "m", n_layers=10**9)
    message, peak = load_error(folder)
    assert message == (f"{folder / 'params.json'}: n_layers is 1000000000, but "
                       "consolidated.safetensors holds the weights of 2 layers")
    assert peak < SMALL  # a tuple of 10^9 sliding windows alone is 8 GB


def test_hugging_face_layer_count_is_checked_the_same_way(make_checkpoint: CheckpointFactory,
                                                           tmp_path: Path) -> None:
    folder = edited(make_checkpoint("hf"), tmp_path / "m", "config.json",
                    num_hidden_layers=10**9)
    message, peak = load_error(folder)
    assert message == (f"{folder / 'config.json'}: num_hidden_layers is 1000000000, but "
                       "model.safetensors holds the weights of 2 layers")
    assert peak < SMALL


@pytest.mark.parametrize(("layout", "config_name", "field"),
                         [("native", "params.json", "n_layers"),
                          ("hf", "config.json", "num_hidden_layers")])
def test_mamba2_layer_count_is_checked_the_same_way(mamba: dict[str, Path], tmp_path: Path,
                                                    layout: str, config_name: str,
                                                    field: str) -> None:
    folder = edited(mamba[layout], tmp_path / "m", config_name, **{field: 10**9})
    weights = "consolidated.safetensors" if layout == "native" else "model.safetensors"
    message, peak = load_error(folder)
    assert message == (f"{folder / config_name}: {field} is 1000000000, but {weights} holds "
                       "the weights of 2 layers")
    assert peak < SMALL


def test_a_billion_experts_is_refused_from_the_headers_alone(make_checkpoint: CheckpointFactory,
                                                             tmp_path: Path) -> None:
    folder = edited(make_checkpoint("native", moe=(4, 2)), tmp_path / "m",
                    moe__num_experts=10**9)
    message, peak = load_error(folder)
    assert message == (f"{folder / 'params.json'}: moe.num_experts is 1000000000, but "
                       "consolidated.safetensors holds the weights of 4 experts")
    assert peak < SMALL


def test_one_layer_more_than_stored_is_named_too(make_checkpoint: CheckpointFactory,
                                                 tmp_path: Path) -> None:
    folder = edited(make_checkpoint("native"), tmp_path / "m", n_layers=3)
    assert load_error(folder)[0] == (f"{folder / 'params.json'}: n_layers is 3, but "
                                     "consolidated.safetensors holds the weights of 2 layers")


# --- widths, against the stored shapes ---------------------------------------------------------


def test_a_huge_width_is_a_shape_mismatch_found_before_any_weight_is_read(
        make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    folder = edited(make_checkpoint("native"), tmp_path / "m", dim=10**12)
    message, peak = load_error(folder)
    assert message == (f"{folder / 'consolidated.safetensors'}: tensor 'tok_embeddings.weight' "
                       "has shape [32768, 64], the config implies [32768, 1000000000000]")
    assert peak < SMALL


def test_sizes_whose_bytes_overflow_are_refused(make_checkpoint: CheckpointFactory,
                                                tmp_path: Path) -> None:
    folder = edited(make_checkpoint("native"), tmp_path / "m", dim=10**10, vocab_size=10**10)
    message, peak = load_error(folder)
    assert message.startswith(f"{folder / 'params.json'}: sizes no model can have (")
    assert "overflow" in message
    assert peak < SMALL


# --- running out of memory while reading the weights -------------------------------------------


class _FailingHandle:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __enter__(self) -> _FailingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get_tensor(self, name: str) -> None:
        raise self.error


# torch 2.13's own words when a CPU tensor cannot be allocated (seen with torch.empty(10**12)).
CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 4000000000000 bytes. Error code 12 "
                 "(Cannot allocate memory)")


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(CPU_ALLOCATOR)],
                         ids=["MemoryError", "torch-cpu-allocator"])
def test_running_out_of_memory_says_the_model_does_not_fit(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch,
        error: BaseException) -> None:
    folder = make_checkpoint("native")
    header = read_safetensors_header(folder / "consolidated.safetensors")
    weights = sum(4 * math.prod(shape) for _, shape in header.values())  # float32
    monkeypatch.setattr(loading, "safe_open", lambda *a, **k: _FailingHandle(error))
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load(folder)
    assert str(info.value) == (f"{folder}: the model does not fit in memory (its weights need "
                               f"{weights / 2**20:.1f} MiB)")


def test_other_runtime_errors_are_not_called_out_of_memory(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "safe_open",
                        lambda *a, **k: _FailingHandle(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        engine.load(make_checkpoint("native"))


# --- JSON nested deeper than Python's parser goes -----------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_header_safetensors(path: Path) -> None:
    header = nested(DEEP).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_deeply_nested_params_json_is_a_load_error(make_checkpoint: CheckpointFactory,
                                                   tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(make_checkpoint("native"), folder)
    (folder / "params.json").write_text(nested(DEEP))
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load(folder)
    assert str(info.value) == f"{folder / 'params.json'}: not valid JSON (nested too deeply)"


def test_deeply_nested_safetensors_header_is_a_load_error(make_checkpoint: CheckpointFactory,
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(make_checkpoint("native"), folder)
    deep_header_safetensors(folder / "consolidated.safetensors")
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load(folder)
    assert str(info.value) == (f"{folder / 'consolidated.safetensors'}: unreadable safetensors "
                               "header (nested too deeply)")


def test_a_header_larger_than_the_format_allows_is_refused_unread(tmp_path: Path,
                                                                  make_checkpoint:
                                                                  CheckpointFactory) -> None:
    folder = tmp_path / "m"
    shutil.copytree(make_checkpoint("native"), folder)
    weights = folder / "consolidated.safetensors"
    size = MAX_SAFETENSORS_HEADER + 1
    with weights.open("wb") as f:  # sparse: the header is never read
        f.write(size.to_bytes(8, "little"))
        f.truncate(8 + size)
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load(folder)
    assert str(info.value) == (f"{weights}: not a safetensors file: a header of {size} bytes "
                               f"(the format allows {MAX_SAFETENSORS_HEADER})")


@pytest.mark.parametrize("break_folder", [
    lambda folder: (folder / "params.json").write_text(nested(DEEP)),
    lambda folder: deep_header_safetensors(folder / "consolidated.safetensors"),
], ids=["params.json", "safetensors-header"])
def test_the_cli_reports_deep_nesting_in_one_line(make_checkpoint: CheckpointFactory,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  break_folder: Callable[[Path], object]) -> None:
    """`cli.main` itself: a RecursionError escaping it is the 30-line traceback users saw."""
    folder = tmp_path / "m"
    shutil.copytree(make_checkpoint("native"), folder)
    break_folder(folder)
    assert cli.main(["complete", str(folder), "--prefix", "def f("]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"tramontane: error: {folder}/")
    assert err.endswith("(nested too deeply)\n")


# --- read_json's other cases ---------------------------------------------------------------------


def test_read_json_turns_every_tagged_float_into_a_float_and_leaves_other_objects(
        tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"a": {"__float__": "Infinity"}, "b": [{"__float__": "-Infinity"}], '
                    '"c": {"__float__": "NaN"}, "d": Infinity, "e": {"__float__": "12"}, '
                    '"f": {"__float__": "Infinity", "other": 1}}')
    data = read_json(path)
    assert data["a"] == math.inf and data["b"] == [-math.inf] and math.isnan(data["c"])
    assert data["d"] == math.inf
    assert data["e"] == {"__float__": "12"}
    assert data["f"] == {"__float__": "Infinity", "other": 1}


def test_a_folder_named_params_json_is_a_load_error(make_checkpoint: CheckpointFactory,
                                                    tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(make_checkpoint("native"), folder)
    (folder / "params.json").unlink()
    (folder / "params.json").mkdir()
    with pytest.raises(engine.ModelLoadError) as info:
        engine.load(folder)
    assert str(info.value) == f"{folder / 'params.json'}: cannot read (Is a directory)"


@pytest.mark.parametrize(("field", "value"), [("norm_eps", "1e-5"), ("rope_theta", None)])
def test_a_float_field_that_is_no_number_is_a_load_error(make_checkpoint: CheckpointFactory,
                                                         tmp_path: Path, field: str,
                                                         value: object) -> None:
    folder = edited(make_checkpoint("native"), tmp_path / "m", **{field: value})
    assert load_error(folder)[0] == (f"{folder / 'params.json'}: {field} must be a number, "
                                     f"got {value!r}")
