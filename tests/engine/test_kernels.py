"""The C++ one-row kernels (`engine.arch.kernels`) against float64 products of the same
weights, with each instruction set's loops the CPU runs (conftest's `isa` fixture), the layers'
choice of path, and the float32 path of bfloat16 prefill."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine.arch import kernels, layers, lora, quant

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="the C++ kernels are not built here "
                                          "(python -m engine.arch.kernels)")


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().t()


@needs_kernels
def test_the_instruction_set_can_be_capped_and_unknown_ones_are_refused() -> None:
    sets = kernels.cpu_instruction_sets()
    assert sets[0] == kernels.instruction_set() and sets[-1] == "portable"
    assert set(sets) <= {"avx512", "avx2", "portable"}
    with kernels.instruction_set_capped("portable") as running:
        assert running == "portable" == kernels.instruction_set()
    assert kernels.instruction_set() == sets[0]
    with kernels.instruction_set_capped("avx512") as running:  # no better than the CPU's
        assert running == sets[0]
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9' "
                                           r"\(portable, avx2 or avx512\)"):
        torch.ops.tramontane.cap_instruction_set("sse9")
    assert kernels.instruction_set() == sets[0]


@pytest.mark.parametrize("k", [8, 48, 72, 1024, 1000])  # tails past the 64-, 32- and 16-wide loops
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_gemv_bf16_is_the_float32_sum_of_products(k: int, xdtype: torch.dtype, strided: bool,
                                                  isa: str) -> None:
    """bfloat16 inputs take AVX512-BF16's dot products where the CPU has them (exact products,
    as the float32 loops'); float32 and float16 ones must not be rounded to bfloat16 for it
    (the float32 tolerance below is 1/400 of a bfloat16 rounding)."""
    torch.manual_seed(k)
    w = torch.randn(37, k).to(torch.bfloat16)
    x = torch.randn(1, 2 * k).to(xdtype)[:, ::2] if strided else torch.randn(1, k).to(xdtype)
    y = torch.ops.tramontane.gemv_bf16(x, w)
    assert y.shape == (1, 37) and y.dtype == xdtype
    want = reference(x, w)
    # float32 sums kept in 8 lanes or more: at most k/8 + 3 roundings of the sum of |products|
    # (the serial sum's bound would be k); then one rounding of the output to its dtype.
    sums = (k / 8 + 3) * 2**-24 * reference(x.abs(), w.abs())
    unit = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[xdtype]
    assert bool(((y.double() - want).abs() <= sums + unit * want.abs()).all())


# a flush every 1024 (AVX2) or 2048 (AVX-512) inputs; tails past the 32- and 64-wide loops
@pytest.mark.parametrize("k", [64, 72, 2048, 1056, 1100, 4160])
def test_gemv_int8_matches_the_dequantized_weight(k: int, isa: str) -> None:
    """The activation row is rounded to int16 (steps of 2^-15 of its largest value): errors of
    a few 1e-5 of the output's scale (its largest value), well below a bfloat16 rounding
    (2^-9 = 2e-3)."""
    torch.manual_seed(k)
    w = torch.randn(48, k)
    q, scale = quant.quantize_int8(w, torch.float32)
    x = torch.randn(1, k)
    y = torch.ops.tramontane.gemv_int8(x, q, scale)
    want = reference(x, q.double() * scale.double()[:, None])
    assert float((y.double() - want).abs().max() / want.abs().max()) <= 2e-4


def int4_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    g = quant.INT4_GROUP
    return ((quant.unpack_int4(packed).double() - 8) * scale.double().repeat_interleave(g, 1)
            + zero.double().repeat_interleave(g, 1))


def int4_product(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor) -> torch.Tensor:
    """What `gemv_int4` computes, in float64: with the vector loops (AVX2, AVX-512), the
    activations rounded to int8 per group of 32 (scale max|x| / 127) in the codes' term, float
    in the zeros' term: y = sum_g s_g <q_g, x~_g> + (z_g - 8 s_g) sum(x_g); with the portable
    loops, x W^T."""
    if kernels.instruction_set() == "portable":
        return reference(x, int4_weight(packed, scale, zero))
    g = quant.INT4_GROUP
    xg = x.double().reshape(x.shape[0], -1, g)
    amax = xg.abs().amax(-1, keepdim=True)
    rounded = torch.round(xg * (127 / amax.clamp(min=1e-300))) * (amax / 127)
    codes = quant.unpack_int4(packed).double() * scale.double().repeat_interleave(g, 1)
    return (rounded.reshape(x.shape) @ codes.t()
            + xg.sum(-1) @ (zero.double() - 8 * scale.double()).t())


# Groups: 1, 3, 8, 9, 10, 32, 17, 19: AVX2's pairs and a lone group; AVX-512's blocks of 16
# groups, then a tail of blocks of 4 and fewer.
@pytest.mark.parametrize("k", [32, 96, 256, 288, 320, 1024, 544, 608])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_gemv_int4_and_dequantize_int4_match_the_portable_form(
        k: int, scale_dtype: torch.dtype, isa: str) -> None:
    torch.manual_seed(k)
    packed, scale, zero = quant.quantize_int4(torch.randn(64, k) + 0.5, scale_dtype)
    s, z = scale.to(scale_dtype), zero.to(scale_dtype)
    w = int4_weight(packed, scale, zero).float()
    # q * s + (z - 8 s) there, (q - 8) * s + z here: float32 roundings apart.
    torch.testing.assert_close(torch.ops.tramontane.dequantize_int4(packed, s, z, 32), w,
                               atol=1e-6, rtol=1e-6)
    x = torch.randn(3, k)
    x[1, :32] = 0  # a group of zeros: its scale is 0, its codes 0
    y = torch.ops.tramontane.gemv_int4(x, packed, s, z, 32)
    want = int4_product(x, packed, scale, zero)
    assert float((y.double() - want).abs().max() / want.abs().max()) <= 2e-6  # float32 sums
    # Against the exact product: each activation is off by at most half a step of its group,
    # so each output by at most sum_g s_g max|x_g| / 254 sum(q_g) (a bound 1-2% of the
    # largest output here; the int4 weights themselves are ~5% off).
    exact = reference(x, w)
    q = quant.unpack_int4(packed).double().reshape(64, -1, 32).sum(-1)  # [rows, groups]
    step = x.double().reshape(3, -1, 32).abs().amax(-1) / 254  # [3, groups]
    bound = step @ (q * scale.double()).t()
    assert bool(((y.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all())


def gemv(mode: str, w: torch.Tensor) -> tuple[Any, tuple[torch.Tensor | int, ...]]:
    """The one-row product of `mode` ("bf16", "int8", "int4") and its weight operands for `w`
    (scales in bfloat16, as a bfloat16 model's)."""
    if mode == "bf16":
        operands: tuple[torch.Tensor | int, ...] = (w.to(torch.bfloat16),)
    elif mode == "int8":
        operands = quant.quantize_int8(w, torch.bfloat16)
    else:  # "int4", or "int4-float32": float32 scales
        scales = torch.float32 if mode.endswith("float32") else torch.bfloat16
        packed, scale, zero = quant.quantize_int4(w, scales)
        operands = (packed, scale.to(scales), zero.to(scales), quant.INT4_GROUP)
    return getattr(torch.ops.tramontane, f"gemv_{mode.split('-')[0]}"), operands


# k = 96: the loops' tails only (int8: 64 + 32; int4: 3 groups); 2112: AVX-512's int8 sums
# flushed at 2048 inputs, int4's blocks of 16 groups then 2 more.
@pytest.mark.parametrize("k", [96, 2112])
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4", "int4-float32"])
def test_several_rows_are_each_rows_own_product(mode: str, k: int, isa: str) -> None:
    """Up to 16 input rows in one call (a keystroke's new prompt tokens, a draft being
    checked): each row's result is bitwise the one-row call's, also where a loop takes up to 4
    input rows at once (BF16's dot products, AVX-512's int8 and int4: the weights loaded once
    for all of them, each row's sums in the one-row order)."""
    torch.manual_seed(0)
    w = torch.randn(80, k)
    op, operands = gemv(mode, w)
    for count in (2, 3, 5, 16):
        x = torch.randn(count, k).to(torch.bfloat16)
        got = op(x, *operands)
        assert got.shape == (count, 80)
        assert torch.equal(got, torch.cat([op(row[None], *operands) for row in x]))


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_the_rows_are_shared_among_torchs_threads_with_the_same_results(mode: str,
                                                                        isa: str) -> None:
    """Built with OpenMP, a product's rows go to torch's intra-op threads (without it, the
    kernels ran on one thread whatever torch was set to); each row is one thread's dot product,
    so the result is bitwise the one-thread result, whether a thread that is done takes rows
    from the others' shares (row_shares.h) or not, on 2, 3 or 4 threads (4 on this 2-core
    machine: the threads are preempted, some finish first and take from the others). Several
    weights in one call, of 4094, 1027 and 2051 rows: the shares and the claims are not whole
    blocks of four and cross from one weight to the next."""
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    w = torch.randn(4094, 256)
    op, operands = gemv(mode, w)
    many = getattr(torch.ops.tramontane, f"gemv_{mode}_many")
    weights = [gemv(mode, torch.randn(rows, 256))[1] for rows in (4094, 1027, 2051)]
    group = weights[0][3:]  # int4's group size
    x = torch.randn(3, 256).to(torch.bfloat16)

    def call_many() -> list[torch.Tensor]:
        return many(x, *[[w[i] for w in weights] for i in range(len(weights[0]) - len(group))],
                    *group)

    try:
        torch.set_num_threads(1)
        assert kernels.parallel_threads() == 1
        alone, alone_many = op(x, *operands), call_many()
        for count in (2, 3, 4):
            torch.set_num_threads(count)
            assert kernels.parallel_threads() == count
            for balanced in (True, False):
                kernels.set_balanced_rows(balanced)
                for _ in range(5):
                    assert torch.equal(op(x, *operands), alone)
                    for got, want in zip(call_many(), alone_many, strict=True):
                        assert torch.equal(got, want)
    finally:
        kernels.set_balanced_rows(True)
        torch.set_num_threads(threads)


@needs_kernels
def test_bad_shapes_are_refused_with_a_message() -> None:
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"expected 1 to 16 rows of 8 values, got \[17, 8\]"):
        torch.ops.tramontane.gemv_bf16(torch.zeros(17, 8), w)
    with pytest.raises(RuntimeError, match=r"expected 1 to 16 rows of 8 values, got \[2, 9\]"):
        torch.ops.tramontane.gemv_bf16(torch.zeros(2, 9), w)
    with pytest.raises(RuntimeError, match="gemv_int8: expected a contiguous 2-D CPU tensor"):
        torch.ops.tramontane.gemv_int8(torch.zeros(8), w, torch.ones(4))
    with pytest.raises(RuntimeError, match="int4: group 32 does not divide 48 inputs"):
        torch.ops.tramontane.gemv_int4(torch.zeros(48), torch.zeros(4, 24, dtype=torch.uint8),
                                       torch.ones(4, 1), torch.ones(4, 1), 32)


@needs_kernels
def test_linear_takes_the_kernel_for_one_bfloat16_row_and_matches_f_linear() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    got = layers.linear(x, w)
    assert got.shape == (1, 1, 96)
    assert torch.equal(got.view(1, -1), torch.ops.tramontane.gemv_bf16(x, w))
    torch.testing.assert_close(got, F.linear(x, w), atol=2e-2, rtol=2**-7)


def test_many_bfloat16_rows_run_in_float32_where_bfloat16_is_emulated() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(2, layers.UPCAST_ROWS, 64).to(torch.bfloat16)
    got = layers.linear(x, w)
    if layers.native_bf16_matmul():
        assert torch.equal(got, F.linear(x, w))
    else:
        assert torch.equal(got, F.linear(x.float(), w.float()).to(torch.bfloat16))


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the allowed slots, in float64."""
    scores = (q.double()[:, :, :, None, :] * keys.double()[:, :, None]).sum(-1)
    scores = scores / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs[..., None] * values.double()[:, :, None]).sum(-2)


@needs_kernels
@pytest.mark.parametrize(("rows", "k"), [
    (1100, 4096),  # panels of 256 weight rows (4 MiB of float32) and a tail of 76
    (40, 1024),    # fewer rows than one panel
])
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_is_the_matmul_of_the_dequantized_weight(
        rows: int, k: int, kind: str, dtype: torch.dtype) -> None:
    """A prompt chunk's product with an int8 or int4 weight, converted by panels: float32 rows,
    the float32 matmul of the whole dequantized weight, up to its summation order; bfloat16
    rows, the product with that weight rounded to bfloat16 (panels of 2048 weight rows at
    1100 x 4096), in float32 sums, rounded once to bfloat16."""
    torch.manual_seed(rows)
    w = torch.randn(rows, k) / 8
    if kind == "int8":
        q, scale = quant.quantize_int8(w, torch.bfloat16)
        tensors: tuple[torch.Tensor, ...] = (q, scale.float())
        group = 0
    else:
        packed, scale, zero = quant.quantize_int4(w, torch.bfloat16)
        tensors, group = (packed, scale.bfloat16(), zero.bfloat16()), 32
    dense = layers.dequantized(kind, tensors, group)
    x = torch.randn(37, k).to(dtype)
    got = torch.ops.tramontane.linear_rows(x, list(tensors), kernels.KINDS[kind], group)
    assert got.shape == (37, rows) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, x @ dense.t(), rtol=1e-5, atol=1e-4)
        return
    want = x.double() @ dense.bfloat16().double().t()
    sums = k * 2**-24 * (x.double().abs() @ dense.double().abs().t())
    assert bool(((got.double() - want).abs() <= sums + 2**-8 * want.abs()).all())
    # and not the float32 weight's product: the weight's rounding shows, ~1.6x the mean error
    # of the output's rounding alone
    off = (x.double() @ dense.double().t() - got.double()).abs().mean()
    assert float(off) > 1.3 * float((want - got.double()).abs().mean())


@needs_kernels
def test_linear_rows_refuses_rows_that_do_not_fit_the_weight() -> None:
    q, scale = quant.quantize_int8(torch.randn(8, 64), torch.float32)
    with pytest.raises(RuntimeError, match=r"linear_rows: expected float32 or bfloat16 CPU "
                                           r"rows of 64 inputs, got Half \[3, 64\]"):
        torch.ops.tramontane.linear_rows(torch.randn(3, 64).half(), [q, scale], 1, 0)
    with pytest.raises(RuntimeError, match=r"got Float \[3, 32\]"):
        torch.ops.tramontane.linear_rows(torch.randn(3, 32), [q, scale], 1, 0)
    with pytest.raises(RuntimeError, match="linear_rows: expected 8 float32 scales"):
        torch.ops.tramontane.linear_rows(torch.randn(3, 64), [q, scale[:4]], 1, 0)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("slots", "groups", "hd"), [
    (37, 4, 64),    # Mistral 7B's grouping: one block of four query heads
    (300, 4, 64),   # the values' blocks of 128 positions: two and a part
    (600, 6, 128),  # Codestral 22B's six: a block of four and one of two
    (5, 3, 64),
    (9, 1, 16),
    (20, 4, 24),    # a head size the AVX2 loops do not take: the portable loops
])
def test_decode_attention_is_float32_softmax_attention_over_the_allowed_slots(
        cache_dtype: torch.dtype, slots: int, groups: int, hd: int, isa: str) -> None:
    """The kernel reads the first `slots` slots of a larger cache (a strided view, as the
    compiled step passes it) and skips the masked ones; float32 roundings from float64."""
    torch.manual_seed(slots)
    q = torch.randn(2, 3, groups, hd).to(torch.bfloat16)
    keys = torch.randn(2, 3, slots + 11, hd).to(cache_dtype)[:, :, :slots]
    values = torch.randn(2, 3, slots + 11, hd).to(cache_dtype)[:, :, :slots]
    allowed = torch.rand(2, 1, 1, slots) > 0.3
    allowed[..., 0] = True
    values.masked_fill_(~allowed.view(2, 1, slots, 1), float("nan"))  # never read
    k, v = torch.randn(2, 3, hd), torch.randn(2, 3, hd)
    slot = torch.tensor([0, -1])  # row 0 writes its new key and value to slot 0, row 1 nothing
    before = keys.clone(), values.clone()
    got = torch.ops.tramontane.decode_attention(q, k, v, keys, values, slot, allowed)
    assert got.shape == (2, 3, groups, hd) and got.dtype == torch.float32
    assert torch.equal(keys[0, :, 0], k[0].to(cache_dtype))
    assert torch.equal(values[0, :, 0], v[0].to(cache_dtype))
    assert torch.equal(keys[0, :, 1:], before[0][0, :, 1:]) and torch.equal(keys[1], before[0][1])
    assert torch.equal(values[1].nan_to_num(), before[1][1].nan_to_num())
    want = attention_reference(q, keys, values.nan_to_num(), allowed)
    assert float((got.double() - want).abs().max()) <= 2e-6


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_rescales_as_the_maximum_rises_block_after_block(
        cache_dtype: torch.dtype, query_dtype: torch.dtype, isa: str) -> None:
    """One pass over blocks of 64 positions (online softmax): scores that grow with the position
    move the running maximum in every block (from 0 to 20: the first blocks' weights fall by
    e^-20 and must be rescaled, not dropped or kept), and a block with nothing allowed
    (positions 64-127) leaves the sums alone. bfloat16 queries over a bfloat16 cache take
    AVX512-BF16's dot products where the CPU has them; float32 queries of other values are
    read as they are (rounded to bfloat16, the result would be ~1e-3 off)."""
    torch.manual_seed(7)
    slots, hd = 250, 64
    q = torch.randn(1, 2, 4, hd).to(query_dtype)
    norm = q[0, :, :1].norm(dim=-1, keepdim=True)  # (2, 1, 1): the first head of each group
    ramp = torch.linspace(0, 20 * hd ** 0.5, slots).view(1, slots, 1) / norm  # its scores 0..20
    keys = (q[0, :, :1] / norm * ramp + 0.1 * torch.randn(2, slots, hd))[None].to(cache_dtype)
    values = torch.randn(1, 2, slots, hd).to(cache_dtype)
    allowed = torch.ones(1, 1, 1, slots, dtype=torch.bool)
    allowed[..., 64:128] = False
    values[:, :, 64:128] = float("nan")  # never read
    new = torch.randn(1, 2, hd)
    got = torch.ops.tramontane.decode_attention(q, new, new, keys, values, torch.tensor([-1]),
                                                allowed)
    want = attention_reference(q, keys, values.nan_to_num(), allowed)
    assert not got.isnan().any()
    assert float((got.double() - want).abs().max()) <= 2e-6


@needs_kernels
def test_decode_attention_with_nothing_allowed_is_zero_and_bad_shapes_are_refused() -> None:
    q, kv, new = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 64)
    nothing, no_write = torch.zeros(1, 8, dtype=torch.bool), torch.tensor([-1])
    attend = torch.ops.tramontane.decode_attention
    assert torch.equal(attend(q, new, new, kv, kv, no_write, nothing), torch.zeros(1, 2, 4, 64))
    with pytest.raises(RuntimeError, match=r"keys \[1, 2, 8, 64\] and values \[1, 2, 8, 32\] "
                                           r"do not match the queries' B 1, Hkv 2, hd 64"):
        attend(q, new, new, kv, kv[..., :32], no_write, nothing)
    with pytest.raises(RuntimeError, match="must both be float32 or bfloat16"):
        attend(q, new, new, kv, kv.double(), no_write, nothing)
    with pytest.raises(RuntimeError, match=r"expected a \(B, S\) boolean mask of 8 values"):
        attend(q, new, new, kv, kv, no_write, nothing[:, :4])
    with pytest.raises(RuntimeError, match="slot 8 is past the 8 slots in use"):
        attend(q, new, new, kv, kv, torch.tensor([8]), nothing)


@needs_kernels
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_linear_many_is_each_layers_own_product_in_one_call(
        mode: quant.QuantMode | str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A query, key and value projection of one row: one call of the `_many` kernel, the same
    values as each layer's own forward (the same loops over the same rows)."""
    torch.manual_seed(0)
    linears = [layers.Linear(64, n, dtype=torch.bfloat16) for n in (64, 32, 32)]
    if mode == "bf16":
        modules: tuple[torch.nn.Module, ...] = tuple(linears)
    else:
        modules = tuple(quant.build(quant.quantize(layer.weight.detach(), mode, torch.bfloat16),
                                    torch.bfloat16, "cpu") for layer in linears)
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    want = [m(x) for m in modules]
    calls: list[str] = []
    op = getattr(torch.ops.tramontane, layers.MANY_KERNELS[mode])
    monkeypatch.setattr(torch.ops.tramontane, layers.MANY_KERNELS[mode],
                        lambda *a: calls.append(mode) or op(*a))
    got = layers.linear_many(x, modules)
    assert calls == [mode]
    assert [tuple(y.shape) for y in got] == [(1, 1, 64), (1, 1, 32), (1, 1, 32)]
    for y, w in zip(got, want, strict=True):
        assert torch.equal(y, w)


def test_linear_many_runs_each_forward_for_mixed_layers_and_many_rows() -> None:
    torch.manual_seed(0)
    a = layers.Linear(64, 16, dtype=torch.bfloat16)
    b = lora.LoRALinear(layers.Linear(64, 16, dtype=torch.bfloat16), lora.ActiveAdapter())
    x = torch.randn(1, 64).to(torch.bfloat16)
    got = layers.linear_many(x, (a, b))  # an adapter-wrapped layer: each its own forward
    assert torch.equal(got[0], a(x)) and torch.equal(got[1], b(x))
    rows = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(layers.linear_many(rows, (a, a))[1], a(rows))


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_builds_is_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """torch's builder waits for the build folder's `lock` to go: one left by a killed build
    (here a CI run stopped mid-build) held every later load, a language server's start
    included, for ever."""
    lock = tmp_path / "lock"
    assert not kernels.clear_stale_lock(tmp_path)  # no lock
    lock.touch()
    assert not kernels.clear_stale_lock(tmp_path) and lock.exists()  # a build under way
    old = time.time() - kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING):
        assert kernels.clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert f"removing {lock}, left 16 min ago by a kernel build that did not finish" \
        in caplog.text


def failing_compiler(tmp_path: Path, pattern: str, message: str) -> dict[str, str]:
    """The environment of a kernel build (into tmp_path) whose compiler, `CXX`, is the system's
    `c++` except when its arguments match the shell `case` pattern: then it prints `message`
    and fails."""
    compiler = tmp_path / "c++"
    compiler.write_text(f'#!/bin/sh\ncase " $* " in {pattern}) echo "{message}" >&2; exit 1;; '
                        'esac\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    return {**os.environ, "CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}


@needs_kernels
def test_a_compiler_without_openmp_gets_the_one_thread_library_once(tmp_path: Path) -> None:
    """A compiler that cannot build with OpenMP (here a wrapper that refuses `-fopenmp`): the
    build says so once and makes the library for one thread, which runs the same products;
    the next load goes straight to it (no failing compile at every start)."""
    env = failing_compiler(tmp_path, '*" -fopenmp "*', "c++: error: unsupported option -fopenmp")
    check = ("import torch; from engine.arch import kernels; kernels.build(); "
             "torch.set_num_threads(2); print(kernels.parallel_threads()); "
             "x = torch.ones(1, 64); w = torch.ones(48, 64).to(torch.bfloat16); "
             "print(float(torch.ops.tramontane.gemv_bf16(x, w).sum()))")
    runs = [subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == ["1", "3072.0"]
    assert "did not build with OpenMP" in runs[0].stderr
    assert "did not build with OpenMP" not in runs[1].stderr
    assert list((tmp_path / "ext").glob(f"*/{kernels.NO_OPENMP}"))


@needs_kernels
def test_an_error_in_the_sources_is_reported_as_itself_not_as_missing_openmp(
        tmp_path: Path) -> None:
    """A compiler that takes OpenMP but fails on one source (a wrapper standing in for a
    genuine compile error): the build fails with the compiler's message, says nothing about
    OpenMP and leaves no one-thread marker behind."""
    env = failing_compiler(tmp_path, "*prefill_linear.cpp*",
                           "prefill_linear.cpp:1:1: error: stand-in failure")
    run = subprocess.run([sys.executable, "-c", "from engine.arch import kernels; kernels.build()"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "RuntimeError: Error building extension 'tramontane_kernels'" in run.stderr
    assert "stand-in failure" in run.stderr
    assert "did not build with OpenMP" not in run.stderr
    assert not list((tmp_path / "ext").glob(f"*/{kernels.NO_OPENMP}"))


def test_every_file_the_sources_include_is_packaged_and_in_the_cache_tag() -> None:
    """An installed engine compiles the kernels on first use, so the package data must hold
    each source and each header they include (once, attention_loops.h was missing); the
    compiled step's cache key (`cache_tag`) digests the same headers."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    root = Path(kernels.__file__).parents[2]
    included: set[Path] = set()
    todo = list(kernels.SOURCES)
    while todo:
        for name in re.findall(r'^#include "([^"]+)"', todo.pop().read_text(), re.MULTILINE):
            path = kernels.HERE / name
            assert path.is_file(), name
            if path not in included:
                included.add(path)
                todo.append(path)
    assert included == set(kernels.HEADERS)
    assert {"attention_loops.h", "input_rows.h", "simd.h"} <= {p.name for p in included}
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["engine"]
    packaged = {p for pattern in patterns for p in (root / "engine").glob(pattern)}
    assert packaged == {*kernels.SOURCES, *kernels.HEADERS}
