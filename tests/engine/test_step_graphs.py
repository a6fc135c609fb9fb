"""The decode step through captured graphs (`engine.runtime.step_graphs`): one capture per
cache and span, replays for every later step, the same logits as the step run directly.

There is no GPU here: the tests capture with `rerun`, which does what a replay does (the step
run again on the static buffers, its result written into the one output tensor), so the
bookkeeping (keys, static inputs and outputs, eviction, reuse across keystrokes through the
prefix cache) is tested on the CPU; `CudaCapture` itself runs where CUDA exists (the last
test).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

import engine
from engine.arch.cache import KVCache
from engine.runtime.compiled import FastDecoder
from engine.runtime.step_graphs import CudaCapture, Replay, StepGraphs
from tests.conftest import CheckpointFactory

SHAPE = dict(dim=48, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, n_layers=2)
PROMPT = [1, *range(300, 330)]
MAX_SEQ_LEN = 192


class Rerun:
    """A capture that replays by running the step again, checking what a capture must hold:
    the step runs on padding rows only, and leaves every cache it sees as it was."""

    def __init__(self, graphs: Callable[[], StepGraphs | None], caches: list[KVCache]) -> None:
        self.graphs, self.caches = graphs, caches
        self.padding_seen: list[list[int]] = []

    def __call__(self, run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        graphs = self.graphs()
        assert graphs is not None
        self.padding_seen.append(graphs.positions.tolist())
        before = [[t.clone() for t in (*c.slot_pos, *c.keys, *c.values)] for c in self.caches]
        out = run()
        for cache, saved in zip(self.caches, before, strict=True):
            now = (*cache.slot_pos, *cache.keys, *cache.values)
            assert all(torch.equal(a, b) for a, b in zip(now, saved, strict=True))

        def replay() -> None:
            out.copy_(run())

        return replay, out


@pytest.fixture(scope="module", params=[None, [8, None]], ids=["full", "window8-and-full"])
def model(request: pytest.FixtureRequest, make_checkpoint: CheckpointFactory) -> engine.Model:
    return engine.load(make_checkpoint("native", sliding_window=request.param, seed=5, **SHAPE))


def graphed(model: engine.Model, caches: list[KVCache], limit: int = 64,
            rewind: int = 0) -> tuple[FastDecoder, Rerun]:
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN, rewind, compile=False)
    capture = Rerun(lambda: decoder.graphs, caches)
    decoder.use_graphs(capture=capture, limit=limit)
    return decoder, capture


def prefilled(model: engine.Model, decoder: FastDecoder, prompt: list[int]) -> KVCache:
    cache = decoder.new_cache()
    with torch.inference_mode():
        model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
    return cache


def test_graphs_give_the_steps_logits_and_capture_once_per_cache_and_span(
        model: engine.Model) -> None:
    """Two documents decoded in turns, 40 steps each: one from 31 tokens (its spans of 64 and
    128 slots), one from 5 (span 64 only): three captures, 80 replays, and every logit equal
    to the step run directly, bit for bit. What a step returned stays as it was after the
    next replays (a copy, not the static output)."""
    plain = FastDecoder(model, 1, MAX_SEQ_LEN, compile=False)
    plain_caches = [prefilled(model, plain, PROMPT), prefilled(model, plain, PROMPT[:5])]
    caches: list[KVCache] = []
    decoder, capture = graphed(model, caches)
    caches += [prefilled(model, decoder, PROMPT), prefilled(model, decoder, PROMPT[:5])]
    graphs = decoder.graphs
    assert graphs is not None
    tokens = [torch.tensor([7]), torch.tensor([9])]
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(40):
        for doc, start in enumerate((len(PROMPT), 5)):
            position = torch.tensor([start + i])
            want = plain.step(tokens[doc], position, plain_caches[doc])
            got = decoder.step(tokens[doc], position, caches[doc])
            assert torch.equal(got, want)
            kept.append((got, want.clone()))
            tokens[doc] = want.argmax(-1)
    assert all(torch.equal(got, want) for got, want in kept)
    assert (graphs.captures, graphs.replays, len(graphs)) == (3, 80, 3)
    assert capture.padding_seen == [[-1]] * 3
    for ours, theirs in zip(caches, plain_caches, strict=True):  # the caches were written alike
        assert all(torch.equal(a, b) for a, b in zip(ours.keys, theirs.keys, strict=True))


def test_the_least_recently_used_graph_is_dropped_past_the_limit(model: engine.Model) -> None:
    """limit=1 with two documents in turns: every step captures again; the results stay
    exact."""
    plain = FastDecoder(model, 1, MAX_SEQ_LEN, compile=False)
    plain_caches = [prefilled(model, plain, PROMPT), prefilled(model, plain, PROMPT[:5])]
    caches: list[KVCache] = []
    decoder, _ = graphed(model, caches, limit=1)
    caches += [prefilled(model, decoder, PROMPT), prefilled(model, decoder, PROMPT[:5])]
    for i in range(3):
        for doc, start in enumerate((len(PROMPT), 5)):
            token, position = torch.tensor([3 + i]), torch.tensor([start + i])
            assert torch.equal(decoder.step(token, position, caches[doc]),
                               plain.step(token, position, plain_caches[doc]))
    assert decoder.graphs is not None
    assert (decoder.graphs.captures, decoder.graphs.replays, len(decoder.graphs)) == (6, 6, 1)


def test_a_typing_session_replays_one_graph_per_document(model: engine.Model) -> None:
    """Through the prefix cache, as the server runs: keystrokes on a document reuse its cache,
    so its graph. Four keystrokes on one document (each types one more token, and the cache
    holds the last prompt and what was generated after it) capture once, a second document
    once more; the tokens and log-probabilities are the eager generation's."""
    prefix_cache = engine.PrefixCache(model, max_seq_len=MAX_SEQ_LEN, budget_bytes=2**26,
                                      rewind=8)
    decoder, _ = graphed(model, [], rewind=8)
    graphs = decoder.graphs
    assert graphs is not None
    sampling = engine.SamplingParams(max_tokens=5)
    typed = [PROMPT + list(range(400, 400 + n)) for n in range(4)] + [PROMPT[:9]]
    keys = ["a.py"] * 4 + ["b.py"]
    want = [list(engine.stream(p, model, sampling, eos_id=-1)) for p in typed]
    model.decoder = decoder
    try:
        got = [list(engine.stream(p, model, sampling, eos_id=-1, prefix_cache=prefix_cache,
                                  cache_key=k)) for p, k in zip(typed, keys, strict=True)]
    finally:
        model.decoder = None
    for g, w in zip(got, want, strict=True):
        assert [e.token for e in g[:-1]] == [e.token for e in w[:-1]]  # type: ignore[union-attr]
        assert [e.logprob for e in g[:-1]] == pytest.approx(  # type: ignore[union-attr]
            [e.logprob for e in w[:-1]], abs=1e-4)  # type: ignore[union-attr]
    assert [e.cached_tokens for e in (g[-1] for g in got)] == [  # type: ignore[union-attr]
        0, len(PROMPT), len(PROMPT) + 1, len(PROMPT) + 2, 0]
    assert graphs.captures == 2
    # 4 decode steps a keystroke (the first token comes from the prefill), and the one new
    # prompt token of keystrokes 2-4 past the cached prefix (a few are stepped, not prefilled)
    assert graphs.replays == 5 * 4 + 3


def test_graphs_refuse_what_they_cannot_run(model: engine.Model) -> None:
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN, compile=False)
    assert decoder.graphs is None  # the CPU: no graphs unless asked
    graphs = decoder.use_graphs(capture=Rerun(lambda: decoder.graphs, []))
    with pytest.raises(ValueError, match=r"expected tokens and positions of shape \(1,\), got "
                                         r"\(2,\) and \(2,\)"):
        graphs(torch.tensor([1, 2]), torch.tensor([0, 1]), [], [], [])
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        StepGraphs(lambda *a: torch.zeros(1), 1, torch.device("cpu"), limit=0)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        CudaCapture(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        FastDecoder(model, 1, MAX_SEQ_LEN, compile=False, cuda_graphs=True)


@pytest.mark.slow
def test_the_compiled_step_through_graphs_compiles_nothing_more(
        make_checkpoint: CheckpointFactory) -> None:
    """The torch.compile graph (what CUDA captures) through `StepGraphs`: 70 steps across two
    spans give the logits the same compiled step gives without graphs, bit for bit, and dynamo
    compiles nothing after the decoder's first compile."""
    model = engine.load(make_checkpoint("native", seed=5, **SHAPE))
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN, native=False)
    assert decoder.compiled
    compiled_before = int(counters["stats"]["unique_graphs"])
    caches = [prefilled(model, decoder, PROMPT) for _ in range(2)]
    tokens = [torch.tensor([7])] * 2
    got_without: list[torch.Tensor] = []
    for pos in range(len(PROMPT), len(PROMPT) + 70):
        got_without.append(decoder.step(tokens[0], torch.tensor([pos]), caches[0]))
        tokens[0] = got_without[-1].argmax(-1)
    graphs = decoder.use_graphs(capture=Rerun(lambda: decoder.graphs, [caches[1]]))
    for pos, want in zip(range(len(PROMPT), len(PROMPT) + 70), got_without, strict=True):
        got = decoder.step(tokens[1], torch.tensor([pos]), caches[1])
        assert torch.equal(got, want)
        tokens[1] = got.argmax(-1)
    assert (graphs.captures, graphs.replays) == (2, 70)
    assert int(counters["stats"]["unique_graphs"]) == compiled_before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_graphs_give_the_compiled_steps_logits(make_checkpoint: CheckpointFactory) -> None:
    """On a GPU: the compiled step replayed from CUDA graphs against the same step launched
    kernel by kernel, 100 steps across span boundaries (float32: within 1e-5; the same kernels
    run in both, only how they are launched differs)."""
    model = engine.load(make_checkpoint("native", seed=5, **SHAPE), device="cuda")
    plain = FastDecoder(model, 1, MAX_SEQ_LEN, cuda_graphs=False)
    decoder = FastDecoder(model, 1, MAX_SEQ_LEN)
    assert plain.graphs is None and decoder.graphs is not None
    caches = [prefilled(model, d, PROMPT) for d in (plain, decoder)]
    token = torch.tensor([7], device="cuda")
    for pos in range(len(PROMPT), len(PROMPT) + 100):
        position = torch.tensor([pos], device="cuda")
        want = plain.step(token, position, caches[0])
        got = decoder.step(token, position, caches[1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        token = want.argmax(-1)
    assert (decoder.graphs.captures, decoder.graphs.replays) == (3, 100)
