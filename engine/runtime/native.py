"""The one-token decode step of a dense decoder on the CPU in C++: `NativeStep`, which
`FastDecoder` runs in place of its compiled graph wherever it can.

A step is one call, `torch.classes.tramontane.DecodeStep.run` (`arch/decode_step.cpp`): the
token embedding, the slot map and mask of each group of layers, every block (norms, the seven
projections, rotary, the cache write and the attention, the SiLU gate and the residuals:
`arch/decode_layer.cpp`) and the output projection. `NativeStep` builds the object once, with
every weight, and passes it each step's tokens, positions and cache. The compiled graph made
~50 kernel and extern calls and checked guards on ~300 inputs (on the 2-core AVX2 machine here
~3 ms of a ~10 ms int4 step, 200M model, outside the weight products); driving the C++ parts
from a Python loop still spent ~0.5 ms of it in the interpreter and the dispatcher. Nothing is
compiled: the step is ready as soon as the model is loaded.

It computes what the eager model computes for one token, with the same roundings in the
model's dtype (`tests/engine/test_native_step.py` holds it to the eager forward and to the
compiled step). What it takes: a dense `Transformer` (SiLU feed-forward; a MoE layer routes
in Python), every projection a bfloat16 or float32 `Linear` (a LoRA-wrapped one runs its base
weight: `Model` runs the decoder only while no adapter is active) or an int8/int4 layer, on
the CPU with the C++ kernels built. `unsupported` says why not, otherwise.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import cast

import torch
import torch.nn.functional as F

from ..arch import kernels
from ..arch.cache import KVCache
from ..arch.layers import FeedForward, KernelLayer, Linear, linear_many, rotary_inv_freq
from ..arch.lora import LoRALinear
from ..arch.transformer import Transformer, TransformerBlock
from ..errors import EngineError

log = logging.getLogger(__name__)

# One operand set: (kind, tensors, int4 group or 0).
Operands = tuple[int, tuple[torch.Tensor, ...], int]
# The prefetch distance is tuned on the products of the first projections that hold
# TUNE_BYTES (the whole of a 22B model would take half a minute a pass), or of them all if
# fewer; a model whose projections hold less than TUNE_MIN_BYTES (about what the caches hold)
# leaves it as it is. TRAMONTANE_STREAM_AHEAD=<bytes> sets it instead.
TUNE_BYTES = 256 << 20
TUNE_MIN_BYTES = 64 << 20
STREAM_AHEAD_ENV = "TRAMONTANE_STREAM_AHEAD"
_tuned: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def operands(layer: torch.nn.Module) -> Operands | None:
    """How the C++ products take this projection, or None (they cannot)."""
    if isinstance(layer, LoRALinear) or (isinstance(layer, Linear)
                                         and layer.weight.dtype == torch.float32):
        weight = cast(torch.Tensor, layer.weight)
        kind = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(weight.dtype)
        return (kernels.KINDS[kind], (weight.detach(),), 0) if kind else None
    if isinstance(layer, KernelLayer):
        plan = layer.kernel_operands()
        if plan is not None:
            name, _, group = plan[0].partition(":")
            return kernels.KINDS[name], tuple(t.detach() for t in plan[1]), int(group or 0)
    return None


def projections(block: TransformerBlock) -> dict[str, torch.nn.Module]:
    """A dense block's seven projections, in `decode_layer`'s order."""
    attention, ffn = block.attention, cast(FeedForward, block.feed_forward)
    return {"wq": attention.wq, "wk": attention.wk, "wv": attention.wv, "wo": attention.wo,
            "w1": ffn.w1, "w3": ffn.w3, "w2": ffn.w2}


class _Layer:
    """One block's operands for `decode_layer`, gathered once."""

    def __init__(self, block: TransformerBlock) -> None:
        plans = [cast(Operands, operands(p)) for p in projections(block).values()]
        self.kinds = [p[0] for p in plans]
        self.weights = [t for p in plans for t in p[1]]
        self.group = max(p[2] for p in plans)
        self.norms = (block.attention_norm.weight.detach(), block.ffn_norm.weight.detach())


def tune_stream_ahead(module: Transformer) -> int | None:
    """Once per model: the kernels' prefetch distance that streams this model's weights fastest
    here (`kernels.tune_stream_ahead`, over the products of its first `TUNE_BYTES` of
    projections), set for the library and returned; None where it stays as it is. A
    `TRAMONTANE_STREAM_AHEAD` that is not a distance the kernels take is logged and ignored."""
    forced = os.environ.get(STREAM_AHEAD_ENV)
    if forced is not None:
        try:
            kernels.set_stream_ahead(int(forced))
            return int(forced)
        except (ValueError, RuntimeError) as e:  # the step runs all the same
            log.warning("%s=%r ignored (%s): the distance is tuned", STREAM_AHEAD_ENV, forced,
                        str(e).splitlines()[0])
    if module in _tuned:
        return None
    chosen: list[torch.nn.Module] = []
    nbytes = 0
    for block in module.layers:
        for projection in projections(cast(TransformerBlock, block)).values():
            if nbytes < TUNE_BYTES:
                chosen.append(projection)
                nbytes += sum(t.numel() * t.element_size()
                              for t in cast(Operands, operands(projection))[1])
    if nbytes < TUNE_MIN_BYTES:
        return None
    _tuned.add(module)
    dtype = module.tok_embeddings.weight.dtype
    inputs = [torch.zeros(1, cast(int, p.in_features), dtype=dtype) for p in chosen]

    def run() -> None:
        for p, x in zip(chosen, inputs, strict=True):
            linear_many(x, (p,))

    ahead, times = kernels.tune_stream_ahead(run)
    log.info("weights prefetched %d bytes ahead (a pass over %.0f MB: %s)", ahead, nbytes / 1e6,
             ", ".join(f"{d}: {t * 1000:.1f} ms" for d, t in times.items()))
    return ahead


def unsupported(module: torch.nn.Module, cache: KVCache) -> str | None:
    """Why `NativeStep` cannot run this model over this cache, or None when it can."""
    if not isinstance(module, Transformer):
        return f"not a dense transformer ({type(module).__name__})"
    if cache.keys[0].device.type != "cpu":
        return "not on the CPU"
    if not kernels.available():
        return "the C++ kernels are not built"
    if cache.batch_size > kernels.MAX_ROWS:
        return f"a batch of {cache.batch_size} rows (the products take {kernels.MAX_ROWS})"
    dtype = module.tok_embeddings.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32) or cache.keys[0].dtype != dtype:
        return f"the model's dtype is {dtype}, the cache's {cache.keys[0].dtype}"
    for i, layer in enumerate(module.layers):
        block = cast(TransformerBlock, layer)
        ffn = block.feed_forward
        if not isinstance(ffn, FeedForward) or ffn.act is not F.silu:
            return f"layer {i}'s feed-forward is a {type(ffn).__name__}, not a dense SiLU one"
        groups = set()
        for name, projection in projections(block).items():
            plan = operands(projection)
            if plan is None:
                return f"layer {i}'s {name} is a {type(projection).__name__} of no C++ product"
            groups |= {plan[2]} - {0}
        if len(groups) > 1:
            return f"layer {i} mixes int4 group sizes {sorted(groups)}"
    if operands(module.output) is None:
        return "the output projection has no C++ product"
    return None


class NativeStep:
    """`FastDecoder`'s step in the C++ kernels: logits `(B, V)` float32 of one token per row
    (position -1: padding), written into a `KVCache` of the decoder's geometry."""

    def __init__(self, module: Transformer, cache: KVCache) -> None:
        why = unsupported(module, cache)
        if why is not None:
            raise EngineError(f"the native decode step cannot run here: {why}")
        tune_stream_ahead(module)
        config = module.config
        layers = [_Layer(cast(TransformerBlock, b)) for b in module.layers]
        kind, tensors, group = cast(Operands, operands(module.output))
        # Built once: the C++ object holds (and has checked) every weight, so a step passes
        # only its tokens, positions and cache.
        self._step = torch.classes.tramontane.DecodeStep(
            module.tok_embeddings.weight.detach(),
            [norm for layer in layers for norm in layer.norms],
            [w for layer in layers for w in layer.weights],
            [k for layer in layers for k in layer.kinds],
            [layer.group for layer in layers],
            module.norm.weight.detach(), list(tensors), kind, group, config.norm_eps,
            rotary_inv_freq(config.head_dim, config.rope_theta, torch.device("cpu")),
            list(cache.layer_group), [g.capacity for g in cache.groups],
            [g.window or 0 for g in cache.groups])
        # New tokens per row one call takes: the products take `kernels.MAX_ROWS` rows (the
        # weights streamed once for all), and a rotating buffer must not lose, to a later
        # token of the chunk, a key an earlier one needs: its spare slots bound the chunk.
        spare = [g.capacity - g.window for g in cache.groups if g.window is not None]
        self.chunk_tokens = max(1, min([kernels.MAX_ROWS // cache.batch_size,
                                        *(s + 1 for s in spare)]))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 spans: list[int], last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(B, V)` float32. `tokens`, `positions`: `(B,)`, or `(B, T)` with T up to
        `chunk_tokens` (consecutive positions per row, -1 padding after a row's last), int64,
        contiguous; then the logits are those of token `last[b]` of each row. `spans[g]`: the
        slots group g attends over (every position written so far lies within them)."""
        return cast(torch.Tensor, self._step.run(tokens, positions, cache.keys, cache.values,
                                                 cache.slot_pos, spans, last))

    def greedy(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               spans: list[int]) -> tuple[list[int], list[float]]:
        """One token per row (`tokens`, `positions`: (B,)), and each row's greedy next token
        with its log-probability, computed where the logits are (`DecodeStep.greedy`): what
        `sampling.sample` and `token_logprobs` give for greedy sampling."""
        ids, logprobs = self._step.greedy(tokens, positions, cache.keys, cache.values,
                                          cache.slot_pos, spans)
        return list(ids), list(logprobs)

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               spans: list[int]) -> tuple[list[int], list[float]]:
        """`tokens`, `positions`: (B, T), T up to `chunk_tokens`, and the greedy token with its
        log-probability after each of them, row-major (B * T of each), in one call: the
        weights stream once for all T (`DecodeStep.verify`)."""
        ids, logprobs = self._step.verify(tokens, positions, cache.keys, cache.values,
                                          cache.slot_pos, spans)
        return list(ids), list(logprobs)
