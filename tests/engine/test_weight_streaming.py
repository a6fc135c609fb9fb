"""How the weights stream from memory: a loaded CPU model's weights on memory advised for 2 MiB
pages (`engine.arch.pages`), and the kernels' prefetch distance, set at run time and tuned per
model (`kernels.tune_stream_ahead`, `runtime.native.tune_stream_ahead`). Neither may change a
single bit of what the model computes."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import engine
from engine.arch import kernels, pages, quant
from engine.arch.transformer import Transformer
from engine.checkpoints.tiny import tiny_config
from engine.runtime import native
from tests.conftest import CheckpointFactory

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="the C++ kernels are not built here")
MiB = 1 << 20


def smaps_entry(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(a, 16) for a in head.split("-"))
            if inside:
                break
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    assert fields, f"no mapping holds {address:#x}"
    return fields


def transparent_huge_pages() -> str:
    """The system's setting: always, madvise or never."""
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text[text.index("[") + 1:text.index("]")]


@pytest.fixture
def stream_ahead() -> Iterator[None]:
    """The library's prefetch distance as it was, after the test."""
    before = kernels.set_stream_ahead(4096) if kernels.available() else None
    yield
    if before is not None:
        kernels.set_stream_ahead(before)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(1024, 300), requires_grad=False)  # 1.2 MB
        self.small = nn.Parameter(torch.randn(16, 16), requires_grad=False)
        self.register_buffer("codes", torch.randint(-128, 127, (2 * MiB,), dtype=torch.int8))
        self.first = nn.Linear(640, 512, bias=False)
        self.second = nn.Linear(640, 512, bias=False)
        self.second.weight = self.first.weight  # tied, as an output layer and an embedding


@pytest.mark.skipif(not pages.enabled(), reason="no transparent huge pages to ask for here")
def test_large_tensors_move_onto_huge_page_memory_with_their_values_and_sharing() -> None:
    torch.manual_seed(0)
    module = Shared()
    before = {name: t.clone() for name, t in module.state_dict().items()}
    small_at = module.small.data_ptr()
    moved = pages.to_huge_pages(module)
    # The 1.2 MB parameter, the 2 MiB buffer and the tied 1.25 MiB weight (once), each a whole
    # number of 4 KiB; the 1 KiB one stays where it was.
    assert moved == 1228800 + 2 * MiB + 1310720
    assert module.small.data_ptr() == small_at
    assert module.second.weight is module.first.weight
    addresses = [module.big.data_ptr(), module.codes.data_ptr(), module.first.weight.data_ptr()]
    assert min(addresses) % (2 * MiB) == 0 and all(a % 4096 == 0 for a in addresses)
    assert all(torch.equal(t, before[name]) for name, t in module.state_dict().items())
    assert isinstance(module.big, nn.Parameter) and not module.big.requires_grad
    entry = smaps_entry(module.big.data_ptr())
    # The kernel may use 2 MiB pages there, unless the system says never.
    assert entry["THPeligible"] == ("0" if transparent_huge_pages() == "never" else "1")
    with torch.no_grad():
        module.first.weight.add_(1)  # the moved tensors are writable, and still shared
    assert torch.equal(module.second.weight, before["first.weight"] + 1)


def test_nothing_moves_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pages.ENV, "0")
    module = Shared()
    at = module.big.data_ptr()
    assert not pages.enabled() and pages.to_huge_pages(module) == 0
    assert module.big.data_ptr() == at


@pytest.mark.skipif(not pages.enabled(), reason="no transparent huge pages to ask for here")
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_loaded_model_is_on_huge_page_memory_and_answers_as_on_malloc_memory(
        make_checkpoint: CheckpointFactory, quantize: str | None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_checkpoint("native", dtype=torch.bfloat16)
    monkeypatch.setenv(pages.ENV, "0")
    plain = engine.load(folder, quantize=quantize, quantized_dir=tmp_path)
    monkeypatch.setenv(pages.ENV, "1")
    huge = engine.load(folder, quantize=quantize, quantized_dir=tmp_path)
    # The embedding table (vocabulary x dim) is the tiny model's one tensor over 1 MiB.
    table = huge.module.tok_embeddings.weight
    assert table.numel() * table.element_size() >= pages.MIN_BYTES
    assert table.data_ptr() % (2 * MiB) == 0
    assert smaps_entry(table.data_ptr())["THPeligible"] == (
        "0" if transparent_huge_pages() == "never" else "1")
    tokens = torch.tensor([[1, 22, 333, 4444, 555, 66, 7]])
    positions = torch.arange(7)[None]
    with torch.no_grad():
        assert torch.equal(plain.forward(tokens, positions, plain.new_cache(1, 8)),
                           huge.forward(tokens, positions, huge.new_cache(1, 8)))
    if quantize:
        assert any(isinstance(m, (quant.Int8Linear, quant.Int4Linear))
                   for m in huge.module.modules())


@needs_kernels
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_the_prefetch_distance_changes_no_bit_of_a_product(mode: str, isa: str,
                                                           stream_ahead: None) -> None:
    torch.manual_seed(1)
    weight = torch.randn(300, 2112).to(torch.bfloat16)
    layer = quant.build(quant.quantize(weight, mode, torch.bfloat16), torch.bfloat16,
                        "cpu") if mode in ("int8", "int4") else None
    x = torch.randn(3, 2112).to(torch.bfloat16)

    def product() -> torch.Tensor:
        if layer is None:
            return torch.ops.tramontane.gemv_bf16(x, weight)  # type: ignore[no-any-return]
        return layer(x)  # type: ignore[no-any-return]

    results = []
    for ahead in (0, 64, 1024, 4096, 1 << 20):
        kernels.set_stream_ahead(ahead)
        results.append(product())
    assert all(torch.equal(r, results[0]) for r in results)


@needs_kernels
def test_a_prefetch_distance_out_of_range_is_refused(stream_ahead: None) -> None:
    for bad in (-64, 100, (1 << 20) + 64):
        with pytest.raises(RuntimeError, match=f"stream_ahead: expected a multiple of 64 bytes "
                                               f"from 0 to 1 MiB, got {bad}"):
            kernels.set_stream_ahead(bad)
    assert kernels.stream_ahead() == 4096  # unchanged
    kernels.set_stream_ahead(512)
    assert kernels.stream_ahead() == 512 == kernels.stream_ahead()


@needs_kernels
def test_tuning_sets_the_distance_of_the_fastest_pass(stream_ahead: None) -> None:
    seen: list[int] = []

    def run() -> None:  # fastest at 1024 bytes ahead
        ahead = kernels.set_stream_ahead(0)
        kernels.set_stream_ahead(ahead)
        seen.append(ahead)
        time.sleep(0.001 if ahead == 1024 else 0.006)

    chosen, times = kernels.tune_stream_ahead(run, choices=(0, 1024, 4096), rounds=2)
    assert chosen == 1024 == kernels.set_stream_ahead(1024)
    assert list(times) == [0, 1024, 4096] and times[1024] < min(times[0], times[4096])
    # A warm-up pass, then the distances in turn, in both orders.
    assert seen == [4096, 0, 1024, 4096, 4096, 1024, 0]


@needs_kernels
def test_a_model_tunes_once_and_the_environment_can_set_the_distance(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        stream_ahead: None) -> None:
    module = Transformer(tiny_config("v3", dim=512, hidden_dim=2048, n_layers=4)).to(
        torch.bfloat16)  # ~33 MB of projections: less than the caches may hold
    assert native.tune_stream_ahead(module) is None
    monkeypatch.setattr(native, "TUNE_MIN_BYTES", 8 << 20)
    monkeypatch.setattr(native, "TUNE_BYTES", 16 << 20)
    calls: list[int] = []
    real = kernels.tune_stream_ahead
    monkeypatch.setattr(kernels, "tune_stream_ahead",
                        lambda run: (calls.append(1), real(run, rounds=1))[1])
    ahead = native.tune_stream_ahead(module)
    assert ahead in kernels.STREAM_AHEAD_CHOICES and kernels.set_stream_ahead(ahead) == ahead
    assert native.tune_stream_ahead(module) is None and calls == [1]  # once per model
    monkeypatch.setenv(native.STREAM_AHEAD_ENV, "512")
    assert native.tune_stream_ahead(module) == 512 == kernels.set_stream_ahead(4096)
    # A value the kernels do not take is logged and ignored: the model tunes as it would
    # have (the first time; the second finds it tuned), and its step runs all the same.
    native._tuned.discard(module)
    for bad, why, tuned in [
            ("ahead", "invalid literal for int() with base 10: 'ahead'", True),
            ("100", "stream_ahead: expected a multiple of 64 bytes from 0 to 1 MiB, got 100",
             False)]:
        monkeypatch.setenv(native.STREAM_AHEAD_ENV, bad)
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            caplog.clear()
            ahead = native.tune_stream_ahead(module)
        assert caplog.messages == [f"TRAMONTANE_STREAM_AHEAD={bad!r} ignored ({why}): "
                                   "the distance is tuned"]
        assert (ahead in kernels.STREAM_AHEAD_CHOICES) if tuned else ahead is None


@pytest.mark.skipif(not pages.enabled(), reason="no transparent huge pages to ask for here")
def test_a_large_kv_cache_is_on_huge_page_memory_and_computes_the_same(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    model = engine.load(make_checkpoint("native"))
    big = model.new_cache(1, 8192)  # 2 layers x keys and values x 2 heads x 8193 x 16 floats
    monkeypatch.setenv(pages.ENV, "0")
    plain = model.new_cache(1, 8192)
    small = model.new_cache(1, 64)
    tensors = sorted(big.keys + big.values, key=lambda t: t.data_ptr())
    assert [tuple(t.shape) for t in big.keys + big.values] == \
        [tuple(t.shape) for t in plain.keys + plain.values] == [(1, 2, 8193, 16)] * 4
    assert tensors[0].data_ptr() % (2 * MiB) == 0
    assert all(t.data_ptr() % 64 == 0 and not t.any() for t in tensors)
    assert all(a.data_ptr() + a.numel() * 4 <= b.data_ptr()  # one after the other, apart
               for a, b in itertools.pairwise(tensors))
    assert smaps_entry(tensors[0].data_ptr())["THPeligible"] == (
        "0" if transparent_huge_pages() == "never" else "1")
    assert all(not t.any() for t in small.keys + small.values)
    tokens = torch.tensor([[1, 22, 333, 4444, 555, 66, 7]])
    positions = torch.arange(7)[None]
    with torch.no_grad():
        assert torch.equal(model.forward(tokens, positions, big),
                           model.forward(tokens, positions, plain))
        step = torch.tensor([[8]]), torch.tensor([[7]])
        assert torch.equal(model.forward(*step, big), model.forward(*step, plain))
    assert all(torch.equal(a, b) for a, b in zip(big.keys + big.values,
                                                 plain.keys + plain.values, strict=True))
