"""Weight-only quantized linear layers: int8 with one scale per output channel, int4 with a scale
and a zero point per group of `INT4_GROUP` input channels. Activations stay in the model dtype.

Why weight-only: decoding one token reads every weight once, so its cost is bytes read; int8
halves them (bfloat16 -> 1 byte per weight plus 4 per row), int4 nearly quarters them (half a
byte plus a bfloat16 scale and zero per 32 weights: 0.625 byte per weight).

Kernels (`Int8Linear` and `Int4Linear` say which runs where): one row (decode) by the C++
kernels of `kernels.py`, which stream the codes at 60-75% of one thread's read bandwidth where
PyTorch's own weight-only kernels (`aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
the fallback when the C++ library is not built) reach 26-42% and inductor's int8 loop 6-8%
(its AVX2 int8-to-float conversion is the bottleneck); many rows (prefill) by a matmul with the
weight dequantized by panels for the call (`layers.panel_rows`): bfloat16 panels where the CPU
multiplies bfloat16 natively, float32 ones elsewhere (4-5x faster than the aten kernels at 256
rows on the AVX2 machine here; on a Zen 4 the bfloat16 panels took 0.35-0.45x the time of
`_weight_int8pack_mm`). Inside
the compiled decode step the kernels are extern calls: the step needs no special case.

Layouts: what is saved (`quantize`'s portable form, in the sidecar file of
`checkpoints/quantized.py`) is device-independent: int8 `[out, in]`; int4 two values per byte
(`[out, in / 2]` uint8, low nibble first) with float32 scales and zeros `[out, in / G]`. On
the CPU the int4 weight is repacked at load into the kernel's own blocked layout
(`_convert_weight_to_int4pack_for_cpu`, which may change between PyTorch versions, hence not
saved). On other devices both layers
dequantize their weight for each call (correct, not fast: the CUDA kernels take other layouts).

Quantization: int8 is symmetric (`scale = max|w| / 127` per row). int4 is asymmetric per group
(`w ~ (q - 8) * scale + zero`, q in 0..15, from the group's min and max): a zero point costs
nothing in the kernel and halves the error of a symmetric 4-bit code on skewed groups. Scales
are rounded to the model dtype first and the codes computed against the rounded values, so the
kernel's dequantization is the one the codes were chosen for.

Which layers: every `Linear` of the blocks and the output projection; not the MoE router
(`feed_forward.gate`: tiny, and a flipped expert choice costs more than its bytes save) nor the
embeddings (a gather of one row per token). With int4 the output projection is int8 (as
llama.cpp keeps its output tensor at 6 bits for its 4-bit types: the logits are sensitive), and
a layer whose shapes the int4 kernel cannot take (rows not a multiple of 16, inputs not of
`INT4_GROUP`) is int8 too.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .layers import KernelLayer, KernelOperands, Linear, native_bf16_matmul, panel_rows

QuantMode = Literal["int8", "int4"]
QUANT_MODES: tuple[QuantMode, ...] = ("int8", "int4")
INT4_GROUP = 32
# The version of the quantization and of the portable layout: part of the sidecar's key.
FORMAT_VERSION = 1


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`w: [out, in]` -> (int8 codes `[out, in]`, float32 scales `[out]` exact in `dtype`)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype).float()
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, dtype: torch.dtype,
                  group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`w: [out, in]` -> (uint8 `[out, in / 2]`: two codes per byte, low nibble first;
    float32 scales and zeros `[out, in / group]`, exact in `dtype`), `w ~ (q - 8) * s + z`."""
    out, inp = w.shape
    wg = w.float().view(out, inp // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype).float()
    zero = (lo + 8 * scale).to(dtype).float()
    q = torch.round((wg - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.view(out, inp // 2, 2)
    return q[..., 0] | (q[..., 1] << 4), scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[out, in / 2]` -> codes 0..15, int32 `[out, in]`."""
    pairs = torch.stack((packed & 15, packed >> 4), dim=-1)
    return pairs.view(packed.shape[0], -1).to(torch.int32)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or on the CPU a copy of it starting on a 64-byte boundary. PyTorch's int8 kernel
    (`_weight_int8pack_mm`) crashed the process on an AVX-512 CPU (a Zen 4) with a weight that
    does not: the int8 codes of a sidecar file, read in place, started 8 bytes short of one.
    The C++ kernels take any address, but their 64-byte loads would each split across two
    cache lines."""
    if t.device.type != "cpu" or t.data_ptr() % 64 == 0:
        return t
    return t.clone()


def _cpu_upcast(x: torch.Tensor) -> bool:
    """Many rows on a CPU whose bfloat16 matmuls are emulated: dequantize to float32."""
    return x.dtype == torch.float32 or not native_bf16_matmul()


class Int8Linear(KernelLayer):
    """`y = x W^T` with `W = q * scale[:, None]`; `q` int8, one scale per output row.

    CPU with the C++ kernels: up to `kernels.MAX_ROWS` rows by `tramontane::gemv_int8`, more
    by a matmul with the weight dequantized by panels (`layers.panel_rows`; 4-5x faster than
    `_weight_int8pack_mm` at 256 rows on the AVX2 machine here, 2.2-2.8x on a Zen 4). Without
    them: PyTorch's `_weight_int8pack_mm`, or where bfloat16 matmuls are emulated a float32
    matmul of the dequantized weight. Other devices: the dequantized weight, at each call."""

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.dtype = dtype
        # Non-persistent: the state dict holds the checkpoint's other tensors; these come from
        # the quantizer or the sidecar file (`quantize`'s portable form, through `build`).
        self.register_buffer("q", aligned(q), persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":
            y = F.linear(rows, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        elif rows.shape[0] <= kernels.MAX_ROWS and kernels.available():
            y = torch.ops.tramontane.gemv_int8(rows, self.q, self.scale)
        elif kernels.available() or (rows.shape[0] > 1 and _cpu_upcast(x)):
            y = panel_rows(rows, "int8", (self.q, self.scale))
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scale.to(x.dtype))
        return cast(torch.Tensor, y).view(*x.shape[:-1], self.out_features)

    def kernel_operands(self) -> KernelOperands | None:
        return ("int8", (self.q, self.scale))

    def weight_bytes(self) -> int:
        return int(self.q.numel() + self.scale.numel() * self.scale.element_size())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(KernelLayer):
    """`y = x W^T` with `W = (q - 8) * scale + zero` per group of `group` inputs.

    CPU with the C++ kernels: the portable codes, scales and zeros in the model dtype; one row
    by `tramontane::gemv_int4`, many by a matmul with the weight dequantized by panels
    (`layers.panel_rows`). CPU without them: PyTorch's `_weight_int4pack_mm_for_cpu` on
    its own packed layout. Other devices: the portable form, dequantized at each call."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 dtype: torch.dtype, group: int = INT4_GROUP) -> None:
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group = group
        self.aten = packed.device.type == "cpu" and not kernels.available()
        # bfloat16 scales and zeros where the model is bfloat16 (exact: they were rounded to
        # it), float32 otherwise: the kernel reads them beside the codes.
        kind = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        if self.aten:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed), 1)
            self.register_buffer("packed", weight, persistent=False)
            self.register_buffer(
                "scales_zeros", torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous(),
                persistent=False)
        else:
            self.register_buffer("packed", aligned(packed), persistent=False)
            self.register_buffer("scale", scale.to(kind).contiguous(), persistent=False)
            self.register_buffer("zero", zero.to(kind).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.aten:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group,
                                                           self.scales_zeros.to(x.dtype))
        elif x.device.type == "cpu" and rows.shape[0] <= kernels.MAX_ROWS:
            y = torch.ops.tramontane.gemv_int4(rows, self.packed, self.scale, self.zero,
                                               self.group)
        elif x.device.type == "cpu":
            y = panel_rows(rows, "int4", (self.packed, self.scale, self.zero), self.group)
        else:
            g = self.group
            q = unpack_int4(self.packed).to(x.dtype) - 8
            y = F.linear(rows, q * self.scale.to(x.dtype).repeat_interleave(g, dim=1)
                         + self.zero.to(x.dtype).repeat_interleave(g, dim=1))
        return cast(torch.Tensor, y).view(*x.shape[:-1], self.out_features)

    def kernel_operands(self) -> KernelOperands | None:
        if self.aten:
            return None
        return (f"int4:{self.group}", (self.packed, self.scale, self.zero))

    def weight_bytes(self) -> int:
        extra = (self.scales_zeros if self.aten else self.scale)
        return int(self.out_features * self.in_features // 2
                   + 2 * self.out_features * (self.in_features // self.group)
                   * extra.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group={self.group}")


QuantLinear = Int8Linear | Int4Linear


def plan(module: nn.Module, mode: QuantMode) -> dict[str, QuantMode]:
    """The scheme of each linear layer to quantize, by module name (see the module docstring
    for which layers and why)."""
    schemes: dict[str, QuantMode] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, Linear) or name.endswith("feed_forward.gate"):
            continue
        scheme = mode
        if mode == "int4" and (name == "output" or layer.out_features % 16 != 0
                               or layer.in_features % INT4_GROUP != 0):
            scheme = "int8"
        schemes[name] = scheme
    return schemes


def quantize(w: torch.Tensor, scheme: QuantMode, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A weight in the portable form of `scheme` (what `build` and the sidecar take)."""
    if scheme == "int8":
        q, scale = quantize_int8(w, dtype)
        return {"q8": q, "scale": scale}
    packed, scale, zero = quantize_int4(w, dtype)
    return {"q4": packed, "scale": scale, "zero": zero}


def build(portable: dict[str, torch.Tensor], dtype: torch.dtype,
          device: torch.device | str) -> QuantLinear:
    """The layer of a portable form (`quantize`'s, or read back from a sidecar)."""
    tensors = {k: v.to(device) for k, v in portable.items()}
    if "q8" in tensors:
        return Int8Linear(tensors["q8"], tensors["scale"], dtype)
    return Int4Linear(tensors["q4"], tensors["scale"], tensors["zero"], dtype)


def install(module: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put each layer in place of the module of that name."""
    modules = dict(module.named_modules())
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else module, child, layer)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the quantized layers' weights, scales and zeros."""
    return sum(m.weight_bytes() for m in module.modules()
               if isinstance(m, (Int8Linear, Int4Linear)))
