"""The C++ kernels of a prompt chunk on CPUs with AVX512-BF16: its attention
(`tramontane::prefill_attention`, bfloat16 dot products) against a float64 reference and SDPA on
the same inputs, attention.py's choice of it, and a bfloat16 model's log-probs with it and with
SDPA; and the bfloat16 panels of int8 and int4 weights (`linear_rows`), value for value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.arch import attention, kernels, layers, quant
from tests.conftest import CheckpointFactory

pytestmark = pytest.mark.skipif(
    not (kernels.available() and torch.ops.tramontane.prefill_attention_here()),
    reason="needs the C++ kernels on a CPU with AVX512-BF16 (elsewhere SDPA runs)")

BF16 = torch.bfloat16


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 softmax attention, (B, T, H, hd); rows with nothing allowed are zeros."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def chunk(B: int, H: int, Hkv: int, T: int, K: int, hd: int, window: int | None = None,
          seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Queries at positions K-T .. K-1 (a chunk after K-T cached keys) as the layers pass them
    (a transposed view of `(B, T, H, hd)`), and their causal (and windowed) mask."""
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, hd).to(BF16).transpose(1, 2)
    keys = torch.randn(B, Hkv, K, hd).to(BF16)
    values = torch.randn(B, Hkv, K, hd).to(BF16)
    qp, kp = torch.arange(K - T, K)[:, None], torch.arange(K)[None, :]
    allowed = kp <= qp
    if window is not None:
        allowed &= qp - kp < window
    return q, keys, values, allowed[None, None].expand(B, 1, T, K).contiguous()


# Shapes: GQA groups of 4, 1 and 6; head dimensions 64 and 128; chunks and contexts that are not
# multiples of the 4-row tiles, the 64-row tasks or the 64-key blocks; a window that starts
# keys mid-block; a first chunk (T == K).
SHAPES = [
    (1, 16, 4, 256, 1536, 64, None),
    (2, 8, 2, 37, 101, 128, None),
    (1, 4, 4, 5, 64, 64, None),
    (1, 6, 1, 70, 200, 64, 90),
    (1, 8, 2, 130, 130, 64, None),
    (1, 8, 2, 1, 300, 128, 33),
]


@pytest.mark.parametrize(("B", "H", "Hkv", "T", "K", "hd", "window"), SHAPES)
def test_prefill_attention_is_as_close_to_float64_as_sdpa(B: int, H: int, Hkv: int, T: int,
                                                          K: int, hd: int,
                                                          window: int | None) -> None:
    """Its errors against float64 are bfloat16's: within a rounding of the output plus one of
    the probabilities (2^-8 of the largest value), and on average no larger than SDPA's on the
    same inputs (which computes in float32 and rounds once)."""
    q, keys, values, allowed = chunk(B, H, Hkv, T, K, hd, window)
    scale = hd ** -0.5
    got = torch.ops.tramontane.prefill_attention(q, keys, values, allowed, scale)
    assert got.shape == (B, T, H, hd) and got.dtype == BF16 and got.is_contiguous()
    want = reference(q, keys, values, allowed, scale)
    error = (got.double() - want).abs()
    assert bool((error <= 2**-8 * want.abs() + 2**-8 * values.double().abs().max()).all())
    sdpa = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed,
                                          enable_gqa=Hkv != H).transpose(1, 2)
    sdpa_error = (sdpa.double() - want).abs()
    assert float(error.mean()) <= 1.05 * float(sdpa_error.mean())
    assert float(error.max()) <= 1.25 * float(sdpa_error.max())


def test_each_rows_own_mask_padding_rows_and_rows_that_attend_nothing() -> None:
    """Rows of one batch see their own masks; a padding query (every key allowed, as the cache
    plans it) is ordinary attention; a query with no key allowed gets zeros."""
    q, keys, values, allowed = chunk(3, 8, 2, 19, 150, 64, seed=1)
    allowed[1, 0, :, :40] = False  # row 1: the first 40 keys are not its own
    allowed[1, 0, 3] = True  # a padding query
    allowed[2, 0, 7] = False  # attends nothing
    got = torch.ops.tramontane.prefill_attention(q, keys, values, allowed, 0.125)
    want = reference(q, keys, values, allowed, 0.125)
    assert bool((got[2, 7] == 0).all())
    error = (got.double() - want).abs()
    assert bool((error <= 2**-8 * want.abs() + 2**-8 * values.double().abs().max()).all())


def test_keys_and_values_may_be_slices_of_a_larger_cache() -> None:
    """The layers pass `cache[:, :, :upto]` (head stride larger than upto * hd): the same result
    as from contiguous copies, bit for bit."""
    q, keys, values, allowed = chunk(1, 8, 2, 40, 300, 64, seed=2)
    big_k = torch.zeros(1, 2, 513, 64, dtype=BF16)
    big_v = torch.zeros(1, 2, 513, 64, dtype=BF16)
    big_k[:, :, :300], big_v[:, :, :300] = keys, values
    sliced = torch.ops.tramontane.prefill_attention(q, big_k[:, :, :300], big_v[:, :, :300],
                                                    allowed, 0.125)
    whole = torch.ops.tramontane.prefill_attention(q.contiguous(), keys, values, allowed, 0.125)
    assert torch.equal(sliced, whole)


def test_one_thread_and_two_give_the_same_bits() -> None:
    q, keys, values, allowed = chunk(1, 16, 4, 100, 700, 64, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.tramontane.prefill_attention(q, keys, values, allowed, 0.125)
        torch.set_num_threads(2)
        two = torch.ops.tramontane.prefill_attention(q, keys, values, allowed, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: {**a, "q": a["q"].float()}, "must be 4-d bfloat16"),
    (lambda a: {**a, "keys": a["keys"][:, :, :-1]}, "do not match q"),
    (lambda a: {**a, "q": a["q"][:, :6]}, "6 query heads do not share 4 key/value heads"),
    (lambda a: {**a, "allowed": a["allowed"][:, :, :, :-1]}, "allowed must be bool"),
    (lambda a: {**a, "allowed": a["allowed"].int()}, "allowed must be bool"),
])
def test_bad_operands_are_refused_with_a_message(change: object, message: str) -> None:
    q, keys, values, allowed = chunk(1, 8, 4, 4, 64, 64)
    operands = change({"q": q, "keys": keys, "values": values, "allowed": allowed})  # type: ignore[operator]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tramontane.prefill_attention(operands["q"], operands["keys"],
                                               operands["values"], operands["allowed"], 0.125)
    q32 = torch.randn(1, 8, 4, 32).to(BF16)
    with pytest.raises(RuntimeError, match="head dimension 32 is not a multiple of 64"):
        torch.ops.tramontane.prefill_attention(q32, keys[..., :32], values[..., :32], allowed,
                                               0.125)


def test_chunk_attention_takes_it_for_bfloat16_heads_of_64_and_sdpa_otherwise() -> None:
    """attention.py chooses: the kernel for bfloat16 heads of 64 where the loops may use
    AVX512-BF16, SDPA for float32, heads of 32, or loops capped below AVX-512."""
    q = torch.zeros(1, 4, 3, 64, dtype=BF16)
    assert attention.bf16_attention(q)
    assert not attention.bf16_attention(q.float())
    assert not attention.bf16_attention(torch.zeros(1, 4, 3, 32, dtype=BF16))
    with kernels.instruction_set_capped("avx2"):  # no BF16 dot products below AVX-512
        assert not attention.bf16_attention(q)
        with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
            torch.ops.tramontane.prefill_attention(*chunk(1, 4, 4, 3, 3, 64), 0.125)
    # Both paths give (B, T, H, hd): a later chunk (the mask) and a first one (SDPA's causal).
    for cached, length in ((80, 20), (0, 33)):
        q, keys, values, allowed = chunk(1, 8, 2, length, cached + length, 64, seed=4)
        fast = attention.chunk_attention(q, keys, values, allowed, causal=cached == 0)
        with kernels.instruction_set_capped("avx2"):
            sdpa = attention.chunk_attention(q, keys, values, allowed, causal=cached == 0)
        assert fast.shape == sdpa.shape == (1, length, 8, 64)
        torch.testing.assert_close(fast.float(), sdpa.float(), atol=2**-7, rtol=2**-7)


def prefill_logprobs(model: engine.Model, prompt: list[int], chunk_size: int) -> torch.Tensor:
    """Log-probs of every prompt position, the prompt fed in chunks (after the first, each
    attends over the cache and itself with an explicit mask)."""
    cache = model.new_cache(1, len(prompt))
    outs = []
    with torch.no_grad():
        for start in range(0, len(prompt), chunk_size):
            piece = prompt[start:start + chunk_size]
            positions = torch.arange(start, start + len(piece))[None]
            outs.append(model.forward(torch.tensor([piece]), positions, cache).float())
    return torch.log_softmax(torch.cat(outs, dim=1), -1)


@pytest.mark.parametrize("window", [None, 48])
def test_a_bfloat16_model_with_the_kernel_is_as_close_to_float32_as_with_sdpa(
        make_checkpoint: CheckpointFactory, window: int | None) -> None:
    """The same checkpoint in float32 is the reference: a bfloat16 prefill in chunks of 50 with
    the kernel, and with SDPA (the loops capped below AVX-512), differ from it alike; a
    window of 48 makes the cache a rotating buffer that the chunks wrap."""
    shape = dict(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512, n_layers=2,
                 sliding_window=window)
    folder = make_checkpoint("native", **shape)
    reference_lp = prefill_logprobs(engine.load(folder, dtype=torch.float32),
                                    PROMPT, 50)
    model = engine.load(folder, dtype=BF16)
    with torch.profiler.profile() as profile:
        kernel_lp = prefill_logprobs(model, PROMPT, 50)
    assert any(e.name == "tramontane::prefill_attention" for e in profile.events())
    with kernels.instruction_set_capped("avx2"):
        sdpa_lp = prefill_logprobs(model, PROMPT, 50)
    kernel_error = float((kernel_lp - reference_lp).abs().mean())
    sdpa_error = float((sdpa_lp - reference_lp).abs().mean())
    assert kernel_error <= 1.25 * sdpa_error
    agree = (kernel_lp.argmax(-1) == reference_lp.argmax(-1)).float().mean()
    assert float(agree) >= 0.95


PROMPT = [1, *[(i * 7919) % 30000 + 100 for i in range(159)]]  # 160 tokens: 4 chunks of 50


@pytest.mark.parametrize(("kind", "group", "scales"), [
    ("int8", 0, torch.float32), ("int4", 32, torch.bfloat16), ("int4", 64, torch.float32),
    ("int4", 16, torch.float32),  # groups the vector loop does not take: the portable loop
])
def test_bfloat16_panels_hold_each_dequantized_weight_rounded_once(
        kind: str, group: int, scales: torch.dtype) -> None:
    """bfloat16 rows multiply panels of the weight converted to bfloat16 (the vector loops for
    int8 and int4 groups of 32k weights): rows of the identity read every panel value back
    exactly, and each is the float32 dequantized weight (the float32 path's) rounded to nearest
    even. 1100 x 200 weights: several panels, rows past the 16-wide loop (int8)."""
    torch.manual_seed(group)
    w = torch.randn(1100, 200 if kind == "int8" else 256) / 8
    if kind == "int8":
        q, scale = quant.quantize_int8(w, torch.float32)
        tensors: tuple[torch.Tensor, ...] = (q, scale)
    else:
        packed, scale, zero = quant.quantize_int4(w, scales, group)
        tensors = (packed, scale.to(scales), zero.to(scales))
    k = w.shape[1]
    got = torch.ops.tramontane.linear_rows(torch.eye(k, dtype=BF16), list(tensors),
                                           kernels.KINDS[kind], group)
    want = layers.dequantized(kind, tensors, group).to(BF16).t()
    assert torch.equal(got, want)
