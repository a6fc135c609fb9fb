"""Invariants of the generation loop on tiny random models: prefill modes agree, batches agree
with single prompts, EOS ends a row, the cache is bounded by the window, cancel is prompt."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import engine
from engine.arch.cache import KVCache
from engine.checkpoints.tiny import tiny_config
from tests.conftest import CheckpointFactory

SHAPE = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, n_layers=3)
PROMPTS = [[1, *range(500, 540)], [1, 42, 43], [1, *range(900, 917)]]


@pytest.fixture(scope="module", params=[None, 6, [6, None, 11]],
                ids=["full", "window6", "per-layer-windows"])
def model(request: pytest.FixtureRequest, make_checkpoint: CheckpointFactory) -> engine.Model:
    return engine.load(make_checkpoint("native", sliding_window=request.param, **SHAPE))


def full_logprobs(model: engine.Model, sequence: list[int]) -> torch.Tensor:
    """Log-softmax at every position of one forward over the whole sequence."""
    cache = model.new_cache(1, len(sequence))
    with torch.inference_mode():
        logits = model.forward(torch.tensor([sequence]), torch.arange(len(sequence))[None], cache)
    return torch.log_softmax(logits[0], -1)


def test_step_by_step_logprobs_equal_one_prefill_of_the_finished_sequence(
        model: engine.Model) -> None:
    prompt = PROMPTS[0]
    tokens, logprobs = engine.generate([prompt], model, max_tokens=12, eos_id=-1)
    sequence = prompt + tokens[0]
    reference = full_logprobs(model, sequence)
    want = [reference[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens[0])]
    assert logprobs[0] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 6, 7, 40, 1000])
def test_chunked_prefill_equals_one_shot(model: engine.Model, chunk: int) -> None:
    one_shot = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1)
    chunked = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1, chunk_size=chunk)
    assert chunked[0] == one_shot[0]
    for got, want in zip(chunked[1], one_shot[1], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_batch_equals_each_prompt_alone(model: engine.Model) -> None:
    batch_tokens, batch_logprobs = engine.generate(PROMPTS, model, max_tokens=8, eos_id=-1)
    for i, prompt in enumerate(PROMPTS):
        tokens, logprobs = engine.generate([prompt], model, max_tokens=8, eos_id=-1)
        assert batch_tokens[i] == tokens[0]
        assert batch_logprobs[i] == pytest.approx(logprobs[0], abs=1e-4)


def test_a_row_stops_at_eos_and_the_others_go_on(model: engine.Model) -> None:
    free, _ = engine.generate(PROMPTS, model, max_tokens=10, eos_id=-1)
    eos = free[1][4]  # make row 1's fifth token the EOS
    first = free[1].index(eos)
    tokens, logprobs = engine.generate(PROMPTS, model, max_tokens=10, eos_id=eos)
    assert tokens[1] == free[1][:first]
    assert len(logprobs[1]) == first
    for i in (0, 2):
        want = free[i][: free[i].index(eos)] if eos in free[i] else free[i]
        assert tokens[i] == want


def test_generation_stops_at_the_tokenizer_eos_by_default(model: engine.Model) -> None:
    out, _ = engine.generate([PROMPTS[0]], model, max_tokens=30)
    assert model.eos_id not in out[0]


def test_max_tokens_zero_returns_nothing(model: engine.Model) -> None:
    assert engine.generate(PROMPTS, model, max_tokens=0) == ([[], [], []], [[], [], []])


def test_seeded_sampling_is_reproducible_and_seed_dependent(model: engine.Model) -> None:
    kwargs = dict(max_tokens=12, temperature=1.5, top_p=0.95, top_k=50, eos_id=-1)
    a = engine.generate(PROMPTS, model, seed=7, **kwargs)  # type: ignore[arg-type]
    b = engine.generate(PROMPTS, model, seed=7, **kwargs)  # type: ignore[arg-type]
    c = engine.generate(PROMPTS, model, seed=8, **kwargs)  # type: ignore[arg-type]
    assert a == b
    assert a[0] != c[0]


def test_bad_requests_raise_clear_errors(model: engine.Model) -> None:
    with pytest.raises(engine.GenerationError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], model)
    with pytest.raises(engine.GenerationError, match=r"prompt 0 has token ids outside "
                                                     r"\[0, 32768\): \[40000\]"):
        engine.generate([[1, 40000]], model)
    with pytest.raises(engine.GenerationError, match=r"prompt 1 .*: \[-1, 2\.5, '3'\]"):
        engine.generate([[1], [5, -1, 2.5, 7, "3"]], model)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="temperature must be"):
        engine.generate([[1, 2]], model, temperature=-0.5)
    with pytest.raises(ValueError, match="chunk_size must be"):
        engine.generate([[1, 2]], model, chunk_size=0)


def test_cache_memory_is_bounded_by_the_window_not_the_prompt() -> None:
    config = tiny_config("v3", n_layers=4, sliding_window=4096)
    long = KVCache(config, 1, 100_000 + 64, device="cpu", dtype=torch.bfloat16)
    short = KVCache(config, 1, 4096, device="cpu", dtype=torch.bfloat16)
    assert long.nbytes() == short.nbytes()
    assert [g.capacity for g in long.groups] == [4096]
    # Full-attention layers, in contrast, grow with the sequence.
    mixed = KVCache(tiny_config("v3", n_layers=4, sliding_window=[4096, None]), 1, 100_064,
                    device="cpu", dtype=torch.bfloat16)
    assert sorted(g.capacity for g in mixed.groups) == [4096, 100_064]


@pytest.mark.parametrize("window", [None, 6])
def test_a_chunk_writes_its_slots_and_nothing_else(window: int | None) -> None:
    """Two rows of a batch, one padded, in a full cache and in a rotating one that a chunk
    wraps: every kept token's key and value land in its slot (the padding and the overwritten
    tokens in the sink), every other slot keeps what it held, and the write copies no cache
    (the CPU's `scatter_` of bfloat16 went through a float32 copy of the whole cache twice)."""
    config = tiny_config("v3", n_layers=1, sliding_window=window, n_kv_heads=2, head_dim=8)
    cache = KVCache(config, 2, 16, device="cpu", dtype=torch.bfloat16, rewind=0)
    cap = cache.groups[0].capacity
    old_k = torch.randn(cache.keys[0].shape).to(torch.bfloat16)
    old_v = torch.randn(cache.values[0].shape).to(torch.bfloat16)
    cache.keys[0].copy_(old_k)
    cache.values[0].copy_(old_v)
    positions = torch.tensor([[*range(0, 9)], [-1, -1, *range(0, 7)]])
    k = torch.randn(2, 2, 9, 8).to(torch.bfloat16)
    v = torch.randn(2, 2, 9, 8).to(torch.bfloat16)
    plan = cache.plan(positions)[0]
    with torch.profiler.profile() as prof:
        cache.update(0, k, v, plan)
    copies = [e for e in prof.events() if e.name == "aten::copy_"]
    assert copies == []
    want_k, want_v = old_k.clone(), old_v.clone()
    for b in range(2):
        last = int(positions[b].max())
        for t, p in enumerate(positions[b].tolist()):
            if p >= 0 and p > last - cap:  # kept: the buffer's last `cap` positions
                want_k[b, :, p % cap] = k[b, :, t]
                want_v[b, :, p % cap] = v[b, :, t]
    assert torch.equal(cache.keys[0][:, :, :cap], want_k[:, :, :cap])
    assert torch.equal(cache.values[0][:, :, :cap], want_v[:, :, :cap])
    assert plan.slots.tolist() == [[p % cap if p > 8 - cap else cap for p in range(9)],
                                   [cap, cap, *[p % cap if p > 6 - cap else cap
                                                for p in range(7)]]]


class CountingModel:
    """Wraps a model to count forwards and to run a callback after each one."""

    def __init__(self, model: engine.Model) -> None:
        self._model = model
        self.forwards = 0
        self.after_forward: list[object] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._model, name)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self._model.forward(*args, **kwargs)  # type: ignore[arg-type]
        self.forwards += 1
        return out


def test_cancel_after_a_token_stops_the_stream_at_once(model: engine.Model) -> None:
    counting = CountingModel(model)
    cancel = engine.CancellationToken()
    events = []
    for event in engine.stream(PROMPTS[0], counting, engine.SamplingParams(max_tokens=50),  # type: ignore[arg-type]
                               cancel=cancel, eos_id=-1):
        events.append(event)
        if len(events) == 3:
            forwards_at_cancel = counting.forwards
            cancel.cancel()
    assert isinstance(events[-1], engine.EndEvent)
    assert events[-1].reason == "cancelled"
    assert events[-1].generated_tokens == 3
    assert counting.forwards - forwards_at_cancel <= 1


def test_cancel_from_another_thread_stops_within_one_step(model: engine.Model) -> None:
    counting = CountingModel(model)
    cancel = engine.CancellationToken()
    seen = threading.Event()
    forwards_at_cancel: list[int] = []

    def canceller() -> None:
        seen.wait(10)
        forwards_at_cancel.append(counting.forwards)
        cancel.cancel()

    thread = threading.Thread(target=canceller)
    thread.start()
    events = []
    for event in engine.stream(PROMPTS[0], counting, engine.SamplingParams(max_tokens=2000),  # type: ignore[arg-type]
                               cancel=cancel, eos_id=-1):
        events.append(event)
        seen.set()
    thread.join()
    end = events[-1]
    assert isinstance(end, engine.EndEvent) and end.reason == "cancelled"
    assert end.generated_tokens < 2000
    assert counting.forwards - forwards_at_cancel[0] <= 1


def test_cancel_before_start_skips_prefill(model: engine.Model) -> None:
    counting = CountingModel(model)
    cancel = engine.CancellationToken()
    cancel.cancel()
    events = list(engine.stream(PROMPTS[0], counting, engine.SamplingParams(max_tokens=5),  # type: ignore[arg-type]
                                cancel=cancel, chunk_size=4))
    assert counting.forwards == 0
    assert events == [engine.EndEvent("cancelled", len(PROMPTS[0]), 0, events[0].prefill_seconds,  # type: ignore[union-attr]
                                      0.0)]


def test_cancel_during_chunked_prefill_stops_between_chunks(model: engine.Model) -> None:
    class CancelAfterFirst(CountingModel):
        def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
            out = super().forward(*args, **kwargs)
            cancel.cancel()
            return out

    cancel = engine.CancellationToken()
    counting = CancelAfterFirst(model)
    events = list(engine.stream(PROMPTS[0], counting, engine.SamplingParams(max_tokens=5),  # type: ignore[arg-type]
                                cancel=cancel, chunk_size=4))
    assert counting.forwards == 1  # 41 prompt tokens = 11 chunks; only the first ran
    assert len(events) == 1 and events[0].reason == "cancelled"  # type: ignore[union-attr]


def test_the_model_context_bounds_prompt_and_generation(make_checkpoint: CheckpointFactory,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(make_checkpoint("native", **SHAPE), folder)
    params = json.loads((folder / "params.json").read_text())
    params["max_position_embeddings"] = 20
    (folder / "params.json").write_text(json.dumps(params))
    model = engine.load(folder)
    with pytest.raises(engine.GenerationError, match="a prompt of 20 tokens leaves no room in "
                       "the model's context of 20 tokens"):
        engine.generate([list(range(1, 21))], model)
    tokens, _ = engine.generate([list(range(1, 16))], model, max_tokens=10, eos_id=-1)
    assert len(tokens[0]) == 5
    events = list(engine.stream(list(range(1, 16)), model, engine.SamplingParams(max_tokens=10),
                                eos_id=-1))
    # 15 prompt tokens prefilled and 4 of the 5 generated fed back: 19 computed.
    assert events[-1] == engine.EndEvent("length", 15, 5, events[-1].prefill_seconds,  # type: ignore[union-attr]
                                         events[-1].decode_seconds,  # type: ignore[union-attr]
                                         computed_tokens=19)
