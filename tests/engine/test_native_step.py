"""The decode step in C++ (`engine.runtime.native`, `arch/decode_step.cpp`): what it computes
against the eager forward, what a padding row leaves, when it runs, and what it refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import engine
from engine.arch import kernels
from engine.errors import EngineError
from engine.runtime import native
from engine.runtime.compiled import FastDecoder
from tests.conftest import CheckpointFactory

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="the C++ kernels are not built here")

SHAPE = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, n_layers=2)
PROMPT = [1, *range(300, 330)]
MAX_SEQ_LEN = 64


def side_by_side(model: engine.Model, decoder: FastDecoder, steps: int,
                 rewind: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """PROMPT prefilled eagerly into the decoder's cache and an eager one, then `steps`
    greedy tokens (the eager path's) fed to both: (native, eager) logits per step."""
    fast, slow = decoder.new_cache(), model.new_cache(1, MAX_SEQ_LEN, rewind)
    tokens = torch.tensor([PROMPT])
    with torch.inference_mode():
        for cache in (fast, slow):
            model.forward(tokens, torch.arange(len(PROMPT))[None], cache)
        token = torch.tensor([7])
        for pos in range(len(PROMPT), len(PROMPT) + steps):
            got = decoder.step(token, torch.tensor([pos]), fast)
            want = model.forward(token[:, None], torch.tensor([[pos]]), slow,
                                 output_index=torch.zeros(1, dtype=torch.long))
            yield got, want
            token = want.argmax(-1)


@pytest.mark.parametrize("rewind", [0, 5])
@pytest.mark.parametrize("window", [None, [8, None]], ids=["full", "window8-and-full"])
def test_float32_logits_are_the_eager_forwards_within_1e_5(
        make_checkpoint: CheckpointFactory, window: list[int | None] | None,
        rewind: int) -> None:
    """Float32 holds no rounding of its own: only the summation orders differ (measured
    6.7e-6 and 9.5e-6 at logits up to 20), over 24 steps in which the window of 8 wraps."""
    model = engine.load(make_checkpoint("native", sliding_window=window, **SHAPE))
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN, rewind, native=True)
    assert decoder.native is not None and not decoder.compiled
    for got, want in side_by_side(model, decoder, 24, rewind):
        assert float((got - want).abs().max()) <= 2e-5
        assert int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_bfloat16_and_quantized_logits_stay_within_the_compiled_steps_bounds(
        make_checkpoint: CheckpointFactory, tmp_path: Path, mode: str | None, isa: str) -> None:
    """The bounds test_compiled_step.py holds the compiled graph to: within two bfloat16 steps
    of the largest logit (int4: ten; measured 1.2, 0.8 and 4.9), greedy tokens agreeing at 20
    of 24 steps or more (near-ties flip with the attention's float32 against eager's
    bfloat16). The same roundings as eager otherwise: bfloat16 values at the same places.
    With each instruction set's loops (both sides run them)."""
    model = engine.load(make_checkpoint("native", seed=3, dtype=torch.bfloat16, **SHAPE),
                        quantize=mode, quantized_dir=tmp_path)
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN, 5, native=True)
    worst, largest, agree = 0.0, 0.0, 0
    for got, want in side_by_side(model, decoder, 24, 5):
        worst = max(worst, float((got - want).abs().max()))
        largest = max(largest, float(want.abs().max()))
        agree += int(got.argmax()) == int(want.argmax())
    assert worst <= (10 if mode == "int4" else 2) * 2**-7 * largest
    assert agree >= 20


@pytest.mark.parametrize("window", [None, [8, None]], ids=["full", "window8-and-full"])
def test_a_chunk_of_new_tokens_is_the_eager_forward_of_that_chunk(
        make_checkpoint: CheckpointFactory, window: list[int | None] | None) -> None:
    """Two rows, 6 and 3 new tokens (the second padded with -1), in one `prefill` call after a
    31-token prompt: each row's last logits and the next step's logits are the eager
    forward's within 2e-5 (float32). With a window of 8 and 5 spare slots the chunk is at
    most 6 tokens (a seventh would overwrite a key the first still needs), and the buffer
    wraps inside the chunk."""
    model = engine.load(make_checkpoint("native", sliding_window=window, **SHAPE))
    decoder = FastDecoder(model, 2, MAX_SEQ_LEN, 5, native=True)
    assert decoder.chunk_tokens == (6 if window else kernels.MAX_ROWS // 2)
    fast, slow = decoder.new_cache(), model.new_cache(2, MAX_SEQ_LEN, 5)
    n = len(PROMPT)
    prompt = torch.tensor([PROMPT, PROMPT])
    chunk = torch.tensor([[40, 41, 42, 43, 44, 45], [50, 51, 52, 0, 0, 0]])
    positions = torch.arange(n, n + 6).repeat(2, 1)
    positions[1, 3:] = -1
    last = torch.tensor([5, 2])
    with torch.inference_mode():
        for cache in (fast, slow):
            model.forward(prompt, torch.arange(n).repeat(2, 1), cache)
        got = decoder.prefill(chunk, positions, fast, last)
        want = model.forward(chunk, positions, slow, output_index=last)
        assert float((got - want).abs().max()) <= 2e-5
        step = torch.tensor([n + 6, n + 3])
        got = decoder.step(torch.tensor([3, 4]), step, fast)
        want = model.forward(torch.tensor([[3], [4]]), step[:, None], slow,
                             output_index=torch.zeros(2, dtype=torch.long))
    assert float((got - want).abs().max()) <= 2e-5
    with pytest.raises(ValueError, match=r"expected tokens and positions of shape \(2, T\), T "
                                         r"up to \d+, got \(2, 17\)"):
        decoder.prefill(torch.zeros(2, 17, dtype=torch.long),
                        torch.zeros(2, 17, dtype=torch.long), fast, last)


def test_a_padding_row_changes_nothing_and_the_real_row_is_as_if_alone(
        make_checkpoint: CheckpointFactory) -> None:
    """A batch of two with row 1 padding (position -1): row 0's logits are bitwise those of the
    same step in a batch of one (each row is its own dot products), and row 1's cache (slot
    map, keys, values) is left as it was."""
    model = engine.load(make_checkpoint("native", sliding_window=[8, None], **SHAPE))
    single = FastDecoder(model, 1, MAX_SEQ_LEN, native=True)
    pair = FastDecoder(model, 2, MAX_SEQ_LEN, native=True)
    one, two = single.new_cache(), pair.new_cache()
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        model.forward(prompt, torch.arange(len(PROMPT))[None], one)
        model.forward(prompt.repeat(2, 1), torch.arange(len(PROMPT))[None].repeat(2, 1), two)
        before = [t[1].clone() for t in (*two.slot_pos, *two.keys, *two.values)]
        pos = len(PROMPT)
        alone = single.step(torch.tensor([7]), torch.tensor([pos]), one)
        both = pair.step(torch.tensor([7, 9]), torch.tensor([pos, -1]), two)
    assert torch.equal(both[0], alone[0])
    after = [t[1] for t in (*two.slot_pos, *two.keys, *two.values)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_generation_runs_the_native_step_by_default_and_agrees_with_eager(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """`enable_fast_decode` takes the native step where it can (nothing compiled); the
    generation loop takes it for every step after the first token, and a prefix cache's few
    new prompt tokens go through it in one call."""
    model = engine.load(make_checkpoint("native", **SHAPE))
    sampling = engine.SamplingParams(max_tokens=12)
    grown = [*PROMPT, 11, 12, 13, 14, 15]
    want = [list(engine.stream(p, model, sampling, eos_id=-1)) for p in (PROMPT, grown)]
    decoder = engine.enable_fast_decode(model, MAX_SEQ_LEN, rewind=8)
    assert decoder.compile_seconds == 0.0 and not decoder.compiled
    assert decoder.chunk_tokens == kernels.MAX_ROWS
    calls: list[tuple[str, tuple[int, ...]]] = []
    run, greedy = native.NativeStep.__call__, native.NativeStep.greedy

    def counting(self: native.NativeStep, tokens: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(("logits", tuple(tokens.shape)))
        return run(self, tokens, *args)  # type: ignore[arg-type]

    def counting_greedy(self: native.NativeStep, tokens: torch.Tensor,
                        *args: object) -> tuple[list[int], list[float]]:
        calls.append(("greedy", tuple(tokens.shape)))
        return greedy(self, tokens, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(native.NativeStep, "__call__", counting)
    monkeypatch.setattr(native.NativeStep, "greedy", counting_greedy)
    cache = engine.PrefixCache(model, max_seq_len=MAX_SEQ_LEN, budget_bytes=2**26, rewind=8)
    try:
        got = [list(engine.stream(p, model, sampling, eos_id=-1, prefix_cache=cache,
                                  cache_key="doc")) for p in (PROMPT, grown)]
        calls_greedy = list(calls)
        calls.clear()
        list(engine.stream(PROMPT, model, engine.SamplingParams(max_tokens=3, temperature=0.8,
                                                                seed=1), eos_id=-1))
    finally:
        model.decoder = None
    # 11 steps each, greedy sampling in the step; the second prompt's 5 new tokens in one call
    assert calls_greedy == ([("greedy", (1,))] * 11 + [("logits", (1, 5))] +
                            [("greedy", (1,))] * 11)
    assert calls == [("logits", (1,))] * 2  # sampling at a temperature takes the logits
    assert got[1][-1].cached_tokens == len(PROMPT)  # type: ignore[union-attr]
    for events, expected in zip(got, want, strict=True):
        assert [e.token for e in events[:-1]] == [  # type: ignore[union-attr]
            e.token for e in expected[:-1]]  # type: ignore[union-attr]
        assert [e.logprob for e in events[:-1]] == pytest.approx(  # type: ignore[union-attr]
            [e.logprob for e in expected[:-1]], abs=1e-4)  # type: ignore[union-attr]


def test_what_the_native_step_does_not_take_falls_back_or_is_refused(
        make_checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MoE model has no native step (nor a compiled one), nor has a batch of more rows than
    the products take; without the kernels the compiled graph runs; `native=True` says why it
    cannot."""
    moe = engine.load(make_checkpoint("native", moe=(4, 2), **SHAPE))
    assert native.unsupported(moe.module, moe.new_cache(1, 32)) == (
        "layer 0's feed-forward is a MoeFeedForward, not a dense SiLU one")
    model = engine.load(make_checkpoint("native", **SHAPE))
    assert native.unsupported(model.module, model.new_cache(17, 32)) == (
        "a batch of 17 rows (the products take 16)")
    with pytest.raises(EngineError, match=r"cannot run here: a batch of 17 rows"):
        FastDecoder(model, 17, 32, native=True)
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(EngineError, match="the native decode step cannot run here: the C.. "
                                          "kernels are not built"):
        FastDecoder(model, 1, 32, native=True)
    eager = FastDecoder(model, 1, 32, compile=False)
    assert eager.native is None


def test_bad_operands_get_a_message() -> None:
    ops = torch.ops.tramontane
    h = torch.zeros(1, 64)
    keys = torch.zeros(1, 2, 9, 16)
    w = torch.zeros(64, 64)
    with pytest.raises(RuntimeError, match="decode_layer: expected the 7 weights wq wk wv wo w1 "
                                           "w3 w2, got 2"):
        ops.decode_layer(h, torch.ones(64), torch.ones(64), [w, w], [3, 3], 0, 1e-5,
                         torch.zeros(1, dtype=torch.long), torch.ones(8), keys, keys.clone(),
                         8, torch.zeros(1, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="decode_layer: fewer weight tensors than their "
                                           "kinds take"):
        ops.decode_layer(h, torch.ones(64), torch.ones(64), [w], [3] * 7, 0, 1e-5,
                         torch.zeros(1, dtype=torch.long), torch.ones(8), keys, keys.clone(),
                         8, torch.zeros(1, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="decode_layer: the weights' shapes do not make a "
                                           "decoder layer of width 64 with 2 key/value heads "
                                           "of 16"):
        ops.decode_layer(h, torch.ones(64), torch.ones(64), [w] * 7, [3] * 7, 0, 1e-5,
                         torch.zeros(1, dtype=torch.long), torch.ones(8), keys, keys.clone(),
                         8, torch.zeros(1, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="decode_slots: expected a \\(1, capacity \\+ 1\\) "
                                           "int64 slot map, a span within the capacity"):
        ops.decode_slots(torch.zeros(1, dtype=torch.long),
                         torch.full((1, 9), -1, dtype=torch.long), 8, 0, 9)


def test_the_step_object_refuses_bad_input_and_keeps_stepping(
        make_checkpoint: CheckpointFactory) -> None:
    """`DecodeStep` (decode_step.cpp) checks what a step passes it: a token outside the
    vocabulary (named by the method that got it: `run` or `verify`), a chunk without its rows'
    last tokens, more rows than the cache has, the wrong number of layers' caches. Each
    is refused with a message before anything is written, and the next good step gives the
    eager path's logits."""
    model = engine.load(make_checkpoint("native", **SHAPE))
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN, native=True)
    step = decoder.native
    assert step is not None
    cache = decoder.new_cache()
    eager = model.new_cache(1, MAX_SEQ_LEN)
    with torch.inference_mode():
        for c in (cache, eager):
            model.forward(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], c)
        at = torch.tensor([len(PROMPT)])
        spans = decoder._spans(cache, at)
        vocab = model.module.tok_embeddings.weight.shape[0]
        with pytest.raises(RuntimeError, match=f"DecodeStep.run: token {vocab} is outside the "
                                               f"vocabulary of {vocab}"):
            step(torch.tensor([vocab]), at, cache, spans)
        with pytest.raises(RuntimeError, match=f"DecodeStep.verify: token {vocab} is outside "
                                               f"the vocabulary of {vocab}"):
            step._step.verify(torch.tensor([[7, vocab]]),
                              torch.tensor([[len(PROMPT), len(PROMPT) + 1]]), cache.keys,
                              cache.values, cache.slot_pos, spans)
        with pytest.raises(RuntimeError, match="a chunk of 2 tokens per row needs each row's "
                                               "last token"):
            step(torch.tensor([[7, 8]]), torch.tensor([[len(PROMPT), len(PROMPT) + 1]]), cache,
                 spans)
        with pytest.raises(RuntimeError, match="2 rows of tokens for a cache of 1"):
            step(torch.tensor([7, 7]), torch.tensor([len(PROMPT)] * 2), cache, spans)
        with pytest.raises(RuntimeError, match="expected the keys and values of 2 layers"):
            step._step.run(torch.tensor([7]), at, cache.keys[:1], cache.values[:1],
                           cache.slot_pos, spans, None)
        got = step(torch.tensor([7]), at, cache, spans)
        want = model.forward(torch.tensor([[7]]), at[None], eager,
                             output_index=torch.zeros(1, dtype=torch.long))
    assert float((got - want).abs().max()) <= 2e-5


def test_the_step_object_refuses_weights_that_do_not_make_its_layers() -> None:
    """Checked once, when `NativeStep` builds it: one float32 layer of width 64 here."""
    w = torch.zeros(64, 64)

    def build(norms: int, weights: int, layer_group: int) -> None:
        torch.classes.tramontane.DecodeStep(
            torch.zeros(10, 64), [torch.ones(64)] * norms, [w] * weights, [3] * 7, [0],
            torch.ones(64), [torch.zeros(10, 64)], 3, 0, 1e-5, torch.ones(8), [layer_group],
            [8], [0])

    with pytest.raises(RuntimeError, match="DecodeStep: expected 2 norms, 7 kinds and a group "
                                           "for each of the 1 layers"):
        build(1, 7, 0)
    with pytest.raises(RuntimeError, match="DecodeStep: more weights than the kinds take"):
        build(2, 8, 0)
    with pytest.raises(RuntimeError, match="DecodeStep: fewer weights than the kinds take"):
        build(2, 6, 0)
    with pytest.raises(RuntimeError, match="DecodeStep: layer 0's cache group 1 does not exist"):
        build(2, 7, 1)


@pytest.mark.parametrize("vocab", [32768, 13])
def test_greedy_is_argmax_and_log_softmax_of_the_logits(vocab: int, isa: str) -> None:
    """The native step's greedy sampling (`tramontane::greedy`): torch.argmax's token (the
    first of equal maxima, the first NaN) and the log-softmax there to float32's precision
    (NaN where the maximum is not finite, as torch.log_softmax), under each instruction
    set's loops."""
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab).bfloat16().float() * 4  # bfloat16 values: ties happen
    logits[1, 3] = logits[1, 9] = logits[1].max() + 1  # two equal maxima: the first
    logits[2, 5], logits[2, 8] = float("nan"), float("nan")
    logits[3] = float("-inf")
    logits[4, 7] = float("inf")
    logits[5, -1] = logits[5].max() + 0.5  # in the tail past the last block of 8
    ids, logprobs = torch.ops.tramontane.greedy(logits)
    want = torch.argmax(logits, dim=-1)
    assert ids == want.tolist() and ids[1:3] == [3, 5] and ids[5] == vocab - 1
    # log_softmax in float64: the greedy sum is closer to it than torch's float32 one (2.7e-6
    # off at 32k values here)
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, want[:, None]).squeeze(-1)
    for row in (0, 1, 5):
        assert logprobs[row] == pytest.approx(float(expected[row]), abs=3e-7)
    assert all(torch.tensor(logprobs[2:5]).isnan())
    assert bool(expected[2:5].isnan().all())


def test_greedy_refuses_what_is_not_float32_logits() -> None:
    with pytest.raises(RuntimeError, match=r"greedy: expected contiguous \(B, V\) float32 "
                                           r"CPU logits, got \[4\] Float"):
        torch.ops.tramontane.greedy(torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"got \[2, 3\] BFloat16"):
        torch.ops.tramontane.greedy(torch.zeros(2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [[5, 6, 7], [5, 0, 1]], ids=["in-order", "wrapping"])
def test_a_layers_new_tokens_attend_as_one_after_the_other(dtype: torch.dtype, slots: list[int],
                                                           isa: str) -> None:
    """Several new tokens of a row (a keystroke's, a draft's) read the cache once for all of
    them: bitwise the layer run on each token in turn, keys and values included. "wrapping":
    a rotating buffer whose later tokens overwrite slots 0 and 1, which the first token still
    attends to: in turn, it saw the old keys there, and so it must here."""
    torch.manual_seed(0)
    ops = torch.ops.tramontane
    weights = [torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64),
               torch.randn(64, 64), torch.randn(128, 64), torch.randn(128, 64),
               torch.randn(64, 128)]
    weights = [(w / 8).to(dtype) for w in weights]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    keys, values = torch.randn(1, 2, 8, 16).to(dtype), torch.randn(1, 2, 8, 16).to(dtype)
    h = torch.randn(3, 64).to(dtype)
    positions = torch.tensor([5, 6, 7])
    slot = torch.tensor(slots)
    allowed = torch.zeros(3, 8, dtype=torch.bool)
    for t in range(3):
        allowed[t, : 6 + t] = True  # causal: the slots before, and its own

    def layer(rows: slice, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = ops.decode_layer(
            h[rows], torch.ones(64, dtype=dtype), torch.ones(64, dtype=dtype), weights,
            [0 if dtype == torch.bfloat16 else 3] * 7, 0, 1e-5, positions[rows], inv_freq, k,
            v, 8, slot[rows].contiguous(), allowed[rows].contiguous())
        return out

    k1, v1 = keys.clone(), values.clone()
    together = layer(slice(0, 3), k1, v1)
    k2, v2 = keys.clone(), values.clone()
    in_turn = torch.cat([layer(slice(t, t + 1), k2, v2) for t in range(3)])
    assert torch.equal(together, in_turn)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
