"""The C++ one-row kernels (`engine.arch.kernels`) against float64 products of the same
weights, the layers' choice of path, and the float32 path of bfloat16 prefill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.arch import kernels, layers, quant

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="the C++ kernels are not built here "
                                          "(python -m engine.arch.kernels)")


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).view(-1)


@needs_kernels
@pytest.mark.parametrize("k", [8, 72, 1024, 1000])  # tails past the 32-wide loops included
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
def test_gemv_bf16_is_the_float32_sum_of_products(k: int, xdtype: torch.dtype) -> None:
    torch.manual_seed(k)
    w = torch.randn(37, k).to(torch.bfloat16)
    x = torch.randn(1, k).to(xdtype)
    y = torch.ops.tramontane.gemv_bf16(x, w)
    assert y.shape == (37,) and y.dtype == xdtype
    want = reference(x, w)
    tol = 2**-8 if xdtype == torch.bfloat16 else 1e-5  # one rounding of the output
    assert float(((y.double() - want).abs() / want.abs().clamp(min=1)).max()) <= tol


@needs_kernels
@pytest.mark.parametrize("k", [64, 72, 2048, 1056])  # a flush every 1024 inputs; tails
def test_gemv_int8_matches_the_dequantized_weight(k: int) -> None:
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


@needs_kernels
@pytest.mark.parametrize("k", [32, 96, 1024])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_gemv_int4_and_dequantize_int4_match_the_portable_form(
        k: int, scale_dtype: torch.dtype) -> None:
    torch.manual_seed(k)
    packed, scale, zero = quant.quantize_int4(torch.randn(64, k) + 0.5, scale_dtype)
    s, z = scale.to(scale_dtype), zero.to(scale_dtype)
    g = quant.INT4_GROUP
    w = ((quant.unpack_int4(packed) - 8) * scale.repeat_interleave(g, 1)
         + zero.repeat_interleave(g, 1))
    # q * s + (z - 8 s) there, (q - 8) * s + z here: float32 roundings apart.
    torch.testing.assert_close(torch.ops.tramontane.dequantize_int4(packed, s, z, g), w,
                               atol=1e-6, rtol=1e-6)
    x = torch.randn(1, k)
    y = torch.ops.tramontane.gemv_int4(x, packed, s, z, g)
    want = reference(x, w)  # the activations in int16, as for int8
    assert float((y.double() - want).abs().max() / want.abs().max()) <= 2e-4


@needs_kernels
def test_bad_shapes_are_refused_with_a_message() -> None:
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected one row of 8 values"):
        torch.ops.tramontane.gemv_bf16(torch.zeros(2, 8), w)
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
    assert torch.equal(got.view(-1), torch.ops.tramontane.gemv_bf16(x, w))
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
