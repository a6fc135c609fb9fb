"""The compiled one-token decode step over a `KVCache`: `decode_one` for caches of one geometry
(opt-in).

Where the C++ kernels are built and the model is a dense decoder on the CPU, `FastDecoder`
runs the native step instead (`native.py`: the same step as one C++ call, nothing to
compile, a fraction of the graph's overhead); the compiled graph below serves the rest (no
kernels, other devices, `native=False`). On a CUDA device its steps replay CUDA graphs, one
captured per cache and span (`step_graphs.py`).

Decoding one token per row reads every weight once per token, so its speed is set by memory
traffic and per-step overhead, not arithmetic. The eager path loses on all three counts: its
matrix-vector products (oneDNN/MKL through `F.linear`) stream the weights at about half the
memory bandwidth, CPU SDPA is slow for a single query (bfloat16 especially), and each step runs
hundreds of small ops from Python, `KVCache.plan` building masks on the way. `FastDecoder`:

- calls the model's own layers (`block.attention.wq(x)`, `block.feed_forward(x)`, the norms),
  so what a layer computes is its own business: `arch.layers.Linear` turns a one-row product
  into the C++ weight-streaming kernel (or, without it, inductor's loop), a LoRA-wrapped or
  quantized layer brings its own forward, and nothing here special-cases them (projections of
  the same input go through `linear_many`, one kernel call where the layers share a kernel);
- attends over the first `span` slots of the preallocated cache, a dimension the compiled graph
  takes as dynamic, so one graph serves every length up to `max_seq_len` and attention costs
  what the tokens written so far cost (sliding-window layers attend over their whole rotating
  buffer, a static size: see `step`); its inputs are copied to fresh contiguous tensors and
  caches are always ordinary tensors (`Model.new_cache`), so no call fails a guard: one
  compile per decoder, none after it (`tests/engine/test_compiled_step.py` counts them);
- does the cache bookkeeping (slot map, mask) inside the graph, and the key/value writes with
  the attention in one C++ op on the cache itself (`tramontane::decode_attention`; without the
  kernels, index_put writes and inductor's loops);
- compiles one decoder layer once and reuses it for every layer (`nested_compile_region`, the
  layer passed as an argument): a fraction of the compile time of the unrolled graph.

Same cache, same semantics as `Transformer.forward` with one token per row: prefill with the
eager model into a cache of the decoder's geometry (`decoder.new_cache()`), then call
`step(tokens, positions, cache)` per token; a row at position -1 is padding (it changes nothing
the other rows see; its logits are garbage). `runtime.phases.decode_one` does this by itself
once the model has a decoder (`engine.enable_fast_decode`), for caches of its geometry and while
no LoRA adapter is active (the active adapter is a per-thread choice that a compiled graph
cannot see: those steps run eagerly). Loading or unloading an adapter changes which layers are
wrapped, which the graph was traced through: the model sets its decoder aside then, and brings
back the one built for the adapters loaded now, if any (one compiled while adapters are loaded
runs their layers' base path).

Trade-offs, stated: the first compile takes 20-35 s for a 200M model on 2 cores, 2-3 s when
inductor's on-disk cache holds the kernels (a later launch), and nothing for another decoder of
the same shapes in the same process; a decoder with another `max_seq_len` compiles once more.
torch.compile keeps at most 8 versions of a function, so keep one decoder per model and batch
size, sized for the longest request: the cache is allocated at `max_seq_len`, attention reads
only the part in use. No global setting changes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from typing import Any, cast

import torch

from ..arch import kernels
from ..arch.cache import KVCache
from ..arch.layers import FeedForward, apply_rotary, linear_many, rotary_cos_sin
from ..arch.transformer import Transformer, TransformerBlock
from ..errors import EngineError
from .native import NativeStep
from .step_graphs import CAPTURING, Capture, StepGraphs

# The two halves of a decoder layer, as compile regions: traced once, reused for every layer
# (and by every decoder of the same shapes). The key/value writes and the attention happen
# between them, in the outer graph: a region must not mutate its inputs, and what it reads is
# copied into buffers of its own. `shape` = (B, H, Hkv, hd).


@torch.compiler.nested_compile_region
def _qkv(block: TransformerBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, n_heads, hkv, hd = shape
    attention = block.attention
    x = block.attention_norm(h)  # (B, dim)
    q, k, v = linear_many(x, (attention.wq, attention.wk, attention.wv))
    q = apply_rotary(q.view(bsz, 1, n_heads, hd), cos, sin)
    k = apply_rotary(k.view(bsz, 1, hkv, hd), cos, sin)
    return (q.view(bsz, hkv, n_heads // hkv, hd), k.view(bsz, hkv, hd),
            v.view(bsz, hkv, hd))  # q: (B, Hkv, G, hd)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Attention of q `(B, Hkv, G, hd)` over the cache's first S slots, float32 `(B, Hkv, G,
    hd)`, where the C++ kernels are not built (`tramontane::decode_attention` writes the cache
    and attends in one call otherwise). In the outer graph, not in a region: a region's inputs
    are fresh buffers, so the cache, written just before, would be copied into one for every
    layer."""
    # Query heads h*G .. h*G+G-1 share kv head h (SDPA's enable_gqa). Scores and softmax in
    # float32 as SDPA's CPU kernel accumulates them; broadcast-and-sum, so inductor reads the
    # bfloat16 cache converting as it goes.
    qg = q[:, :, :, None, :].float()  # (B, Hkv, G, 1, hd)
    scores = (qg * keys[:, :, None].float()).sum(-1) / math.sqrt(q.shape[-1])  # (B, Hkv, G, S)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs[..., None] * values[:, :, None].float()).sum(-2)  # (B, Hkv, G, hd)


@torch.compiler.nested_compile_region
def _output_and_feed_forward(block: TransformerBlock, h: torch.Tensor, out: torch.Tensor,
                             shape: tuple[int, int, int, int]) -> torch.Tensor:
    bsz, n_heads, _, hd = shape
    h = h + block.attention.wo(out.to(h.dtype).reshape(bsz, n_heads * hd))
    return h + block.feed_forward(block.ffn_norm(h))


class _DecodeStep(torch.nn.Module):
    """The decoder for one token per row over the first S slots of a `KVCache`.

    Runs the model's own modules (no copies of anything). The cache views are arguments,
    written in place.
    """

    def __init__(self, module: Transformer, cache: KVCache, batch_size: int) -> None:
        super().__init__()
        config = module.config
        self.model = module
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.groups = [(g.capacity, g.window) for g in cache.groups]
        self.layer_group = list(cache.layer_group)
        for layer in module.layers:
            if not isinstance(cast(TransformerBlock, layer).feed_forward, FeedForward):
                raise EngineError("the compiled decode step supports dense decoders (MoE layers "
                                  "route tokens in Python): this model decodes eagerly")
        self.shape = (batch_size, config.n_heads, config.n_kv_heads, config.head_dim)

    def forward(
        self,
        tokens: torch.Tensor,  # (B,)
        positions: torch.Tensor,  # (B,), -1 = padding
        slot_pos: list[torch.Tensor],  # per group (B, S): the first S slots of the cache
        keys: list[torch.Tensor],  # per layer (B, Hkv, S, hd)
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        bsz = tokens.shape[0]
        valid = positions >= 0
        qp = positions[:, None]  # (B, 1)
        rows = torch.arange(bsz, device=tokens.device)
        slots, masks = [], []
        # `KVCache.plan` for one token per row (write first, then attend), over the first S
        # slots, which hold every position written so far; unwritten slots hold -1, masked.
        # A padding row writes slot 0's own contents back (the sink is outside the view).
        # Writes are index_put_ (`t[rows, slot] = ...`): inductor makes those in-place stores
        # into the cache, where a scatter_ would copy the whole buffer every step.
        for (cap, window), spos in zip(self.groups, slot_pos, strict=True):
            slot = torch.where(valid, positions % cap, 0)  # (B,)
            spos[rows, slot] = torch.where(valid, positions, spos[rows, 0])
            allowed = (spos >= 0) & (spos <= qp)  # (B, S)
            if window is not None:
                allowed &= qp - spos < window
            allowed |= qp < 0  # padding rows attend to everything (finite garbage)
            slots.append(slot)
            masks.append(allowed[:, None, None, :])  # (B, 1, 1, S)
        model = self.model
        cos, sin = rotary_cos_sin(positions[:, None], self.head_dim, self.rope_theta,
                                  model.tok_embeddings.weight.dtype)  # (B, 1, 1, hd)
        keep = valid[:, None, None]
        native = tokens.device.type == "cpu" and kernels.available()
        write_slots = [torch.where(valid, slot, -1) for slot in slots]  # -1: no write

        h = model.tok_embeddings(tokens)  # (B, dim)
        for i, layer in enumerate(model.layers):
            block = cast(TransformerBlock, layer)
            g = self.layer_group[i]
            q, k, v = _qkv(block, h, cos, sin, self.shape)
            if native:  # the op writes the new key and value, then attends
                out = torch.ops.tramontane.decode_attention(q, k, v, keys[i], values[i],
                                                            write_slots[g], masks[g])
            else:
                keys[i][rows, :, slots[g]] = torch.where(keep, k, keys[i][rows, :, 0])
                values[i][rows, :, slots[g]] = torch.where(keep, v, values[i][rows, :, 0])
                out = _attend(q, keys[i], values[i], masks[g])
            h = _output_and_feed_forward(block, h, out, self.shape)
        return cast(torch.Tensor, model.output(model.norm(h))).float()  # (B, V)


class FastDecoder:
    """One-token decode steps for `batch_size` rows over its own `KVCache(max_seq_len)`.

    Prefill with `model.forward(..., decoder.cache)`, then `step(tokens, positions)` per token;
    `reset()` empties the cache for the next request. One compiled graph serves every request
    and every length up to `max_seq_len`: attention reads the first `span` slots, the written
    positions rounded up to a multiple of `SPAN_STEP`. `compile=False` runs the same code
    eagerly (tests, debugging). On a CUDA device the steps replay CUDA graphs (`graphs`,
    `step_graphs.py`), unless `cuda_graphs=False` or TRAMONTANE_CUDA_GRAPHS=0.
    """

    SPAN_STEP = 64

    def __init__(self, model: Any, batch_size: int, max_seq_len: int, rewind: int = 0, *,
                 compile: bool = True, native: bool | None = None,
                 cuda_graphs: bool | None = None) -> None:
        if not isinstance(model.module, Transformer):
            raise EngineError(f"FastDecoder supports the dense transformer, not "
                              f"{type(model.module).__name__}")
        kernels.available()  # load the C++ kernels now: not while dynamo traces the layers
        self.model = model
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.rewind = rewind
        self.cache: KVCache = model.new_cache(batch_size, max_seq_len, rewind)
        device = self.cache.keys[0].device
        self._graph = _DecodeStep(model.module, self.cache, batch_size)
        self._fn: Callable[..., torch.Tensor] = self._graph
        # The C++ step (`native.py`) where it runs: nothing to compile, a fraction of the
        # graph's overhead. native=None: where supported, unless compile=False asks for the
        # Python code run eagerly or TRAMONTANE_NATIVE_STEP=0 is set; True: required; False:
        # the graph.
        self.native: NativeStep | None = None
        if native is None and os.environ.get("TRAMONTANE_NATIVE_STEP", "1") == "0":
            native = False  # the compiled graph wherever it runs (tests of it, comparisons)
        if native or (native is None and compile):
            try:
                self.native = NativeStep(model.module, self.cache)
            except EngineError:  # it says why (`native.unsupported`)
                if native:
                    raise
        self.compiled = compile and self.native is None  # False: eager (tests) or native
        self.compile_seconds = 0.0
        self.graphs: StepGraphs | None = None  # CUDA graphs of the step, once `use_graphs` ran
        if self.compiled:
            # The step's elementwise kernels run on one thread (under a million elements a
            # thread): its norms, rotary and residuals are 1-16k values, the largest is the
            # logits' conversion to float32 (32-131k: ~25 us on one thread), and a parallel
            # region costs more than it saves there. Measured on a busy 2-core machine, the
            # logits' conversion as a parallel region right after the output product's took
            # 4-13 ms: the threads had to be woken again. The weight products and the
            # attention, our C++ kernels, share their work among the threads by themselves.
            self._fn = torch.compile(self._graph, fullgraph=True,
                                     options={"cpp.min_chunk_size": 1 << 20})
            t0 = time.perf_counter()
            # The compile happens here, and inductor's on-disk cache must not hand back a step
            # compiled against other kernels (the ops' output shapes are fixed in it): their
            # sources' digest goes into its key.
            # On a CUDA device the compile runs kernels there, which must not fall inside
            # another decoder's graph capture (`step_graphs.CAPTURING`).
            with torch.compiler.config.patch(  # type: ignore[attr-defined]
                    cache_key_tag=kernels.cache_tag()), \
                    CAPTURING if device.type == "cuda" else contextlib.nullcontext():
                self._warm_up()
            self.compile_seconds = time.perf_counter() - t0
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and \
                os.environ.get("TRAMONTANE_CUDA_GRAPHS", "1") != "0"
        if cuda_graphs:
            self.use_graphs()

    def use_graphs(self, capture: Capture | None = None, limit: int = 64) -> StepGraphs:
        """Route `step` through graphs captured per cache and span (`step_graphs.py`; CUDA's
        by default, where `capture` is None): on a CUDA device, one replay a step instead of
        the step's hundreds of kernel launches."""
        if self.native is not None:
            raise EngineError("the native step runs on the CPU: it has no graphs to capture")
        self.graphs = StepGraphs(self._fn, self.batch_size, self.cache.keys[0].device,
                                 capture=capture, limit=limit)
        return self.graphs

    def _warm_up(self) -> None:
        """Compile now: padding rows only, which leave the cache as it was."""
        pad = torch.full((self.batch_size,), -1, dtype=torch.long,
                         device=self.cache.keys[0].device)
        self.step(torch.zeros_like(pad), pad)

    def reset(self) -> None:
        """Forget every position of the decoder's own cache."""
        self.cache.clear()

    def new_cache(self) -> KVCache:
        """A fresh cache of this decoder's geometry."""
        return cast(KVCache, self.model.new_cache(self.batch_size, self.max_seq_len, self.rewind))

    def accepts(self, cache: object) -> bool:
        """Whether `step` can run over `cache` (the compiled graph's batch size and layout)."""
        return isinstance(cache, KVCache) and cache.geometry() == self.cache.geometry()

    @property
    def chunk_tokens(self) -> int:
        """The most new tokens per row `prefill` takes in one call (0: it takes none)."""
        return self.native.chunk_tokens if self.native is not None else 0

    def _spans(self, cache: KVCache, positions: torch.Tensor) -> list[int]:
        """The slots each group of layers attends over, up to the latest of `positions`."""
        last = int(positions.max())
        if last >= self.max_seq_len:
            raise ValueError(f"position {last} is beyond the cache ({self.max_seq_len})")
        # Every row's positions so far live in slots [0, last], or anywhere in a rotating
        # buffer that has wrapped (then the span is its whole capacity, sink excluded).
        span = max(1, -(-(last + 1) // self.SPAN_STEP)) * self.SPAN_STEP
        # Sliding-window layers attend over their whole (small) rotating buffer: a static
        # size. Only the full-attention group's span is dynamic: two dynamic spans would be
        # guarded equal or unequal as they were when traced (duck sizing, and the reuse of
        # the layer region), and recompile at the first step where that changes.
        return [min(span, g.capacity) if g.window is None else g.capacity
                for g in cache.groups]

    def _check_chunk(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                     what: str) -> None:
        if self.native is None or not self.accepts(cache):
            raise ValueError(f"{what} takes the native step and a cache of its geometry")
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size or \
                not 1 <= tokens.shape[1] <= self.chunk_tokens or positions.shape != tokens.shape:
            raise ValueError(f"expected tokens and positions of shape ({self.batch_size}, T), T "
                             f"up to {self.chunk_tokens}, got {tuple(tokens.shape)} and "
                             f"{tuple(positions.shape)}")

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                output_index: torch.Tensor) -> torch.Tensor:
        """A chunk of `tokens: (B, T)` at `positions: (B, T)` (consecutive per row, -1 after a
        row's last), T up to `chunk_tokens`, in one native call (the weights streamed once for
        all of them): float32 logits `(B, V)` of token `output_index[b]` of each row."""
        self._check_chunk(tokens, positions, cache, "prefill")
        assert self.native is not None
        with torch.inference_mode():
            tokens = tokens.contiguous()
            positions = positions.contiguous()
            return self.native(tokens, positions, cache, self._spans(cache, positions),
                               output_index)

    def greedy(self, tokens: torch.Tensor, positions: torch.Tensor,
               cache: KVCache) -> tuple[list[int], list[float]] | None:
        """`step` and greedy sampling in one native call: each row's next token and its
        log-probability, or None without the native step. `tokens`, `positions`: (B,) int64,
        contiguous (no compiled graph guards on them here)."""
        if self.native is None:
            return None
        return self.native.greedy(tokens, positions, cache, self._spans(cache, positions))

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor,
               cache: KVCache) -> tuple[list[int], list[float]] | None:
        """`tokens: (B, T)` at consecutive `positions: (B, T)` in one native call, T up to
        `chunk_tokens`: the greedy token and its log-probability after every one of them
        (row-major, B * T each), or None without the native step. The same numbers as T steps
        one after the other (each row of a product and of attention runs the same loop)."""
        if self.native is None:
            return None
        self._check_chunk(tokens, positions, cache, "verify")
        with torch.inference_mode():
            tokens = tokens.contiguous()
            positions = positions.contiguous()
            return self.native.verify(tokens, positions, cache, self._spans(cache, positions))

    def step(self, tokens: torch.Tensor, positions: torch.Tensor,
             cache: KVCache | None = None) -> torch.Tensor:
        """Logits `(B, V)` float32 of `tokens: (B,)` at `positions: (B,)` (-1 = padding).

        Writes into `cache` (default: the decoder's own), which must have its geometry.
        """
        cache = self.cache if cache is None else cache
        if not self.accepts(cache):
            raise ValueError(f"cache geometry {cache.geometry()} differs from the decoder's "
                             f"{self.cache.geometry()}")
        if tokens.shape != (self.batch_size,) or positions.shape != (self.batch_size,):
            raise ValueError(f"expected tokens and positions of shape ({self.batch_size},), got "
                             f"{tuple(tokens.shape)} and {tuple(positions.shape)}")
        with torch.inference_mode():
            # The compiled graph guards on its inputs' dispatch keys and strides. Fresh copies
            # in inference mode, with contiguous strides, always match (a copy of B ids is
            # free): a tensor made outside inference mode carries another dispatch key, and a
            # column of a padded prompt (`padded[:, i]`, shape (1,), stride (T,)) keeps its
            # stride through a plain `clone()`: each recompiled the step (seconds) once per
            # process.
            tokens = tokens.clone(memory_format=torch.contiguous_format)
            positions = positions.clone(memory_format=torch.contiguous_format)
            spans = self._spans(cache, positions)
            if self.native is not None:
                return self.native(tokens, positions, cache, spans)
            dynamic = [g.window is None for g in cache.groups]
            slot_pos = [spos[:, :n] for spos, n in zip(cache.slot_pos, spans, strict=True)]
            keys = [k[:, :, : spans[g]] for k, g in zip(cache.keys, cache.layer_group,
                                                         strict=True)]
            values = [v[:, :, : spans[g]] for v, g in zip(cache.values, cache.layer_group,
                                                           strict=True)]
            if self.compiled:
                for t, d in zip(slot_pos, dynamic, strict=True):
                    if d:
                        torch._dynamo.mark_dynamic(t, 1)
                for t, g in zip((*keys, *values), cache.layer_group * 2, strict=True):
                    if dynamic[g]:
                        torch._dynamo.mark_dynamic(t, 2)
            run = self._fn if self.graphs is None else self.graphs
            return run(tokens, positions, slot_pos, keys, values)


def compile_decode_step(model: Any, max_seq_len: int, batch_size: int = 1, rewind: int = 0,
                        *, compile: bool = True, native: bool | None = None,
                        cuda_graphs: bool | None = None) -> FastDecoder:
    """Build the compiled one-token decode step for caches of this size, without installing it
    (`model.decoder = step` does, between two requests). Slow: 20-35 s for a 200M model on 2 CPU
    cores the first time, a few seconds once inductor's disk cache holds the kernels. May run on
    another thread than the model's (it only reads the weights). Raises `EngineError` for
    architectures it does not support."""
    return FastDecoder(model, batch_size, max_seq_len, rewind=rewind, compile=compile,
                       native=native, cuda_graphs=cuda_graphs)


def enable_fast_decode(model: Any, max_seq_len: int, batch_size: int = 1, rewind: int = 0, *,
                       compile: bool = True) -> FastDecoder:
    """`compile_decode_step` and install it: from then on the generation loop decodes with it
    whenever its cache has this geometry (`model.new_cache(batch_size, max_seq_len, rewind)`);
    other batches stay eager."""
    model.decoder = compile_decode_step(model, max_seq_len, batch_size, rewind, compile=compile)
    return model.decoder
