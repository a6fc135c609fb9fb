"""The one-token decode step of a dense decoder on the CPU as a few C++ calls: `NativeStep`,
which `FastDecoder` runs in place of its compiled graph wherever it can.

A step is the token embedding, one `tramontane::decode_slots` per group of layers (slot map
and mask), one `tramontane::decode_layer` per layer (norms, the seven projections, rotary,
the cache write and the attention, the SiLU gate and the residuals: `arch/decode_layer.cpp`)
and one `tramontane::decode_logits`. About 15 calls from Python, where the compiled graph made
~50 kernel and extern calls and checked guards on ~300 inputs: on the 2-core AVX2 machine
here that graph spent ~3 ms of a ~10 ms int4 step (200M model) outside the weight products.
Nothing is compiled: the step is ready as soon as the model is loaded.

It computes what the eager model computes for one token, with the same roundings in the
model's dtype (`tests/engine/test_native_step.py` holds it to the eager forward and to the
compiled step). What it takes: a dense `Transformer` (SiLU feed-forward; a MoE layer routes
in Python), every projection a bfloat16 or float32 `Linear` (a LoRA-wrapped one runs its base
weight: `Model` runs the decoder only while no adapter is active) or an int8/int4 layer, on
the CPU with the C++ kernels built. `unsupported` says why not, otherwise.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from ..arch import kernels
from ..arch.cache import KVCache
from ..arch.layers import FeedForward, KernelLayer, Linear, rotary_inv_freq
from ..arch.lora import LoRALinear
from ..arch.transformer import Transformer, TransformerBlock
from ..errors import EngineError

# The weight kinds of `decode_layer`'s `kinds` (`Kind` in arch/products.h).
KINDS = {"bf16": 0, "int8": 1, "int4": 2, "f32": 3}
# One operand set: (kind, tensors, int4 group or 0).
Operands = tuple[int, tuple[torch.Tensor, ...], int]


def operands(layer: torch.nn.Module) -> Operands | None:
    """How the C++ products take this projection, or None (they cannot)."""
    if isinstance(layer, LoRALinear) or (isinstance(layer, Linear)
                                         and layer.weight.dtype == torch.float32):
        weight = cast(torch.Tensor, layer.weight)
        kind = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(weight.dtype)
        return (KINDS[kind], (weight.detach(),), 0) if kind else None
    if isinstance(layer, KernelLayer):
        plan = layer.kernel_operands()
        if plan is not None:
            name, _, group = plan[0].partition(":")
            return KINDS[name], tuple(t.detach() for t in plan[1]), int(group or 0)
    return None


def projections(block: TransformerBlock) -> dict[str, torch.nn.Module]:
    """A dense block's seven projections, in `decode_layer`'s order."""
    attention, ffn = block.attention, cast(FeedForward, block.feed_forward)
    return {"wq": attention.wq, "wk": attention.wk, "wv": attention.wv, "wo": attention.wo,
            "w1": ffn.w1, "w3": ffn.w3, "w2": ffn.w2}


class _Layer:
    """One block's operands for `decode_layer`, gathered once."""

    def __init__(self, block: TransformerBlock, eps: float) -> None:
        plans = [cast(Operands, operands(p)) for p in projections(block).values()]
        self.kinds = [p[0] for p in plans]
        self.weights = [t for p in plans for t in p[1]]
        self.group = max(p[2] for p in plans)
        self.norms = (block.attention_norm.weight.detach(), block.ffn_norm.weight.detach())
        self.eps = eps


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
        config = module.config
        self.embedding = module.tok_embeddings.weight.detach()
        self.layers = [_Layer(cast(TransformerBlock, b), config.norm_eps)
                       for b in module.layers]
        self.norm = module.norm.weight.detach()
        kind, tensors, group = cast(Operands, operands(module.output))
        self.output = ([kind], list(tensors), group)
        self.eps = config.norm_eps
        self.inv_freq = rotary_inv_freq(config.head_dim, config.rope_theta, torch.device("cpu"))
        self.layer_group = list(cache.layer_group)
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
        ops = torch.ops.tramontane
        plans = [ops.decode_slots(positions, spos, group.capacity, group.window or 0, span)
                 for spos, group, span in zip(cache.slot_pos, cache.groups, spans, strict=True)]
        h = F.embedding(tokens.reshape(-1), self.embedding)  # (B * T, dim)
        for i, layer in enumerate(self.layers):
            slot, allowed = plans[self.layer_group[i]]
            h = ops.decode_layer(h, *layer.norms, layer.weights, layer.kinds, layer.group,
                                 layer.eps, positions, self.inv_freq, cache.keys[i],
                                 cache.values[i], spans[self.layer_group[i]], slot, allowed)
        if tokens.dim() == 2 and tokens.shape[1] > 1:
            assert last is not None
            h = h.view(*tokens.shape, -1)[torch.arange(tokens.shape[0]), last]
        kinds, weights, group = self.output
        return cast(torch.Tensor, ops.decode_logits(h, self.norm, weights, kinds, group,
                                                    self.eps))
