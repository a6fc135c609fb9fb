// Many input rows (a prompt's chunk) times a weight stored as int8 or int4 (or bfloat16): the
// weight converted by panels to the rows' dtype, float32 or bfloat16 (where the CPU multiplies
// bfloat16 natively, `layers.panel_rows` passes bfloat16 rows).
//
//   linear_rows(x, tensors, kind, group): x (M, K) float32 or bfloat16 -> (M, N) of x's dtype
//     = x W^T, the weight given as `decode_layer` takes one (`kind` and its 1-3 tensors,
//     products.h)
//   dequantize_int4(q, scale, zero, group) -> the int4 weight in float32 (N, K)
//
// How: a panel of weight rows at a time (kPanelBytes) is converted into one buffer, and each
// panel is multiplied by PyTorch's matmul (oneDNN or MKL, both threads) straight into its
// columns of the result, while the panel is still in cache. bfloat16 panels hold the float32
// values rounded to nearest (even): one rounding of each weight, as a bfloat16 checkpoint's.
//
// Why: converting the whole weight first (`q.float() * scale`, two passes) wrote 4 bytes per
// parameter into fresh buffers at every call and read them back in the matmul: a first prompt
// of 1530 tokens in chunks of 256 spent 1.6 of its 6.7 s in those conversions with int8
// weights (torch.profiler), where the matmuls took 4.0 s. (bfloat16 weights keep
// `weight.float()`, one vectorised pass: by panels they were no faster.)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "products.h"
#include "simd.h"

namespace {

using namespace tramontane;

// The bytes of one panel: a few MiB stay in the last-level cache for the matmul (1024 rows of
// 1024 float32 inputs; panels of 256 rows were ~8% slower, the whole weight 25-45% slower).
constexpr int64_t kPanelBytes = 4 << 20;
constexpr int64_t kGrain = 16;   // weight rows per thread's task, at least

// Rows r0..r1 of a weight as bfloat16 (rounded to nearest even), a row at a time through a
// float32 row: any kind, any CPU.
void dequantize_rows_bf16_portable(const Weight& w, int64_t r0, int64_t r1, at::BFloat16* out) {
  const int64_t k = w.inputs();
  std::vector<float> row(k);
  for (int64_t r = r0; r < r1; ++r) {
    dequantize_rows(w, r, r + 1, row.data());
    at::BFloat16* to = out + (r - r0) * k;
    for (int64_t i = 0; i < k; ++i) to[i] = at::BFloat16(row[i]);
  }
}

#ifdef TRAMONTANE_X86

// The same for int8 and int4 weights, 16 weights an instruction (the portable loop above, one
// weight at a time, took 0.7 ns a weight: a 1530-token first prompt converts its 145M weights
// 6 times). The float32 values are the portable loop's bit for bit (the same multiply, and
// for int4 the same add, each rounded), then rounded to nearest even as at::BFloat16 does.
TRAMONTANE_AVX512_BF16 inline void store_bf16(at::BFloat16* to, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), (__m256i)_mm512_cvtneps_pbh(v));
}

TRAMONTANE_AVX512_BF16 void int8_rows_bf16(const Weight& w, int64_t r0, int64_t r1,
                                           at::BFloat16* out) {
  const int64_t k = w.inputs();
  const int8_t* q = w.w.data_ptr<int8_t>();
  const float* scale = w.scale.data_ptr<float>();
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* src = q + r * k;
    at::BFloat16* dst = out + (r - r0) * k;
    const __m512 s = _mm512_set1_ps(scale[r]);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      store_bf16(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), s));
    }
    for (; i < k; ++i) dst[i] = at::BFloat16(src[i] * scale[r]);
  }
}

// Sixteen float32 lanes of `(code * s) + z`, two roundings like the portable loop's (the
// product is kept from being fused into the addition).
TRAMONTANE_AVX512_BF16 inline __m512 scaled(__m128i codes, __m512 s, __m512 z) {
  __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), s);
  asm("" : "+v"(product));
  return _mm512_add_ps(product, z);
}

// int4 with groups of a multiple of 32 weights (16 bytes, low nibble first): the 16 bytes
// widened to words, each word's two nibbles put in its two bytes, in order.
template <typename S>
TRAMONTANE_AVX512_BF16 void int4_rows_bf16(const Weight& w, const S* scale, const S* zero,
                                           int64_t r0, int64_t r1, at::BFloat16* out) {
  const int64_t k = w.inputs(), groups = k / w.group;
  const uint8_t* q = w.w.data_ptr<uint8_t>();
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float sf = to_float(scale[r * groups + g]);
      const __m512 s = _mm512_set1_ps(sf);
      const __m512 z = _mm512_set1_ps(to_float(zero[r * groups + g]) - 8.f * sf);
      const uint8_t* src = q + r * (k / 2) + g * (w.group / 2);
      at::BFloat16* dst = out + (r - r0) * k + g * w.group;
      for (int64_t j = 0; j < w.group / 2; j += 16) {
        const __m256i bytes =
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
        const __m256i nibbles =
            _mm256_or_si256(_mm256_and_si256(bytes, _mm256_set1_epi16(15)),
                            _mm256_slli_epi16(_mm256_srli_epi16(bytes, 4), 8));
        store_bf16(dst + 2 * j, scaled(_mm256_castsi256_si128(nibbles), s, z));
        store_bf16(dst + 2 * j + 16, scaled(_mm256_extracti128_si256(nibbles, 1), s, z));
      }
    }
  }
}

#endif

// The panels' buffer, kept from one call to the next by the calling thread: a fresh 4 MiB
// buffer every call came from the kernel as new pages, zeroed on first touch (page faults were
// ~5% of an int4 first prompt's time, `perf`).
at::Tensor panel_buffer(int64_t numel, at::ScalarType dtype) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.scalar_type() != dtype || buffer.numel() < numel) {
    buffer = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return buffer.narrow(0, 0, numel);
}

void dequantize_rows_bf16(const Weight& w, int64_t r0, int64_t r1, at::BFloat16* out) {
#ifdef TRAMONTANE_X86
  if (has_avx512_bf16() && w.kind == Kind::kInt8) return int8_rows_bf16(w, r0, r1, out);
  if (has_avx512_bf16() && w.kind == Kind::kInt4 && w.group % 32 == 0) {
    if (w.scale.scalar_type() == at::kFloat) {
      return int4_rows_bf16(w, w.scale.data_ptr<float>(), w.zero.data_ptr<float>(), r0, r1,
                            out);
    }
    return int4_rows_bf16(w, reinterpret_cast<const uint16_t*>(w.scale.data_ptr<at::BFloat16>()),
                          reinterpret_cast<const uint16_t*>(w.zero.data_ptr<at::BFloat16>()),
                          r0, r1, out);
  }
#endif
  dequantize_rows_bf16_portable(w, r0, r1, out);
}

template <typename S>
void int4_rows(const Weight& w, const S* scale, const S* zero, int64_t r0, int64_t r1,
               float* out) {
  const int64_t k = w.inputs(), groups = k / w.group;
  const uint8_t* q = w.w.data_ptr<uint8_t>();
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = to_float(scale[r * groups + g]);
      const float z = to_float(zero[r * groups + g]) - 8.f * s;
      const uint8_t* src = q + r * (k / 2) + g * (w.group / 2);
      float* dst = out + (r - r0) * k + g * w.group;
      for (int64_t j = 0; j < w.group / 2; ++j) {
        dst[2 * j] = static_cast<float>(src[j] & 15) * s + z;
        dst[2 * j + 1] = static_cast<float>(src[j] >> 4) * s + z;
      }
    }
  }
}

}  // namespace

namespace tramontane {

void dequantize_rows(const Weight& w, int64_t r0, int64_t r1, float* out) {
  const int64_t k = w.inputs();
  switch (w.kind) {
    case Kind::kFloat32:
      std::memcpy(out, w.w.data_ptr<float>() + r0 * k, (r1 - r0) * k * sizeof(float));
      break;
    case Kind::kBF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(w.w.data_ptr<at::BFloat16>()) + r0 * k;
      for (int64_t i = 0; i < (r1 - r0) * k; ++i) out[i] = bf16_to_float(p[i]);
      break;
    }
    case Kind::kInt8: {
      const int8_t* q = w.w.data_ptr<int8_t>();
      const float* s = w.scale.data_ptr<float>();
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t i = 0; i < k; ++i) out[(r - r0) * k + i] = q[r * k + i] * s[r];
      }
      break;
    }
    case Kind::kInt4:
      if (w.scale.scalar_type() == at::kFloat) {
        int4_rows(w, w.scale.data_ptr<float>(), w.zero.data_ptr<float>(), r0, r1, out);
      } else {
        int4_rows(w, reinterpret_cast<const uint16_t*>(w.scale.data_ptr<at::BFloat16>()),
                  reinterpret_cast<const uint16_t*>(w.zero.data_ptr<at::BFloat16>()), r0, r1,
                  out);
      }
      break;
  }
}

at::Tensor linear_rows(const at::Tensor& x, at::TensorList tensors, int64_t kind,
                       int64_t group) {
  const std::vector<Weight> ws = weights_of(tensors, {kind}, group, "linear_rows");
  const Weight& w = ws[0];
  const int64_t n = w.rows(), k = w.inputs();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.device().is_cpu() && (bf16 || x.scalar_type() == at::kFloat) && x.dim() == 2 &&
                  x.size(1) == k,
              "linear_rows: expected float32 or bfloat16 CPU rows of ", k, " inputs, got ",
              x.scalar_type(), " ", x.sizes());
  if (w.kind == Kind::kFloat32 && !bf16) return at::mm(x, w.w.t());
  if (w.kind == Kind::kBF16 && bf16) return at::mm(x, w.w.t());
  const int64_t rows =
      std::max<int64_t>(kGrain, kPanelBytes / (k * x.element_size()) / kGrain * kGrain);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  at::Tensor panel = panel_buffer(std::min(rows, n) * k, x.scalar_type()).view({-1, k});
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t n1 = std::min(n, n0 + rows);
    at::parallel_for(n0, n1, kGrain, [&](int64_t r0, int64_t r1) {
      if (bf16) {
        dequantize_rows_bf16(w, r0, r1, panel.data_ptr<at::BFloat16>() + (r0 - n0) * k);
      } else {
        dequantize_rows(w, r0, r1, panel.data_ptr<float>() + (r0 - n0) * k);
      }
    });
    at::Tensor columns = out.narrow(1, n0, n1 - n0);  // row stride n: the matmul's ldc
    at::mm_out(columns, x, panel.narrow(0, 0, n1 - n0).t());
  }
  return out;
}

at::Tensor dequantize_int4(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                           int64_t group) {
  const std::vector<Weight> ws =
      weights_of({q, scale, zero}, {static_cast<int64_t>(Kind::kInt4)}, group, "int4");
  at::Tensor out = at::empty({ws[0].rows(), ws[0].inputs()}, q.options().dtype(at::kFloat));
  float* to = out.data_ptr<float>();
  at::parallel_for(0, ws[0].rows(), kGrain, [&](int64_t r0, int64_t r1) {
    dequantize_rows(ws[0], r0, r1, to + r0 * ws[0].inputs());
  });
  return out;
}

}  // namespace tramontane

TORCH_LIBRARY_FRAGMENT(tramontane, m) {
  m.def("linear_rows(Tensor x, Tensor[] tensors, int kind, int group) -> Tensor");
  m.def("dequantize_int4(Tensor q, Tensor scale, Tensor zero, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("linear_rows", &tramontane::linear_rows);
  m.impl("dequantize_int4", &tramontane::dequantize_int4);
}
