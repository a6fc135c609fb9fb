// One new token per row: its key and value written into the cache, then its attention over the
// cache, for grouped-query attention: the decode step's attention
// (`torch.ops.tramontane.decode_attention`, registered by kernels.py).
//
//   q (B, Hkv, G, hd): the G query heads that share each key/value head
//   k, v (B, Hkv, hd): the new token's key and value
//   keys, values (B, Hkv, S, hd): the first S slots of the cache (any strides but the last),
//     written in place: row b's k and v go to slot[b] (no write where slot[b] < 0: padding)
//   allowed (B, S) bool: the slots this row attends to (after the write)
//   -> (B, Hkv, G, hd) float32: softmax(q k^T / sqrt(hd)) v over the allowed slots
//
// Why the write is here: the compiled step's graph would otherwise write the cache with an
// index_put and hand this op the written cache as a new value, which inductor materializes as
// a copy of the keys and values in use, every layer and every step (more bytes than the
// attention reads). An op that mutates its inputs (`Tensor(a!)`) is called on the cache itself.
//
// Why our own: inductor's loops for the same broadcast-and-sum read each key once per query
// head, reduce every score horizontally, and sum the values along one dependent chain of
// additions per 16 outputs; at the ~2k positions of a completion prompt that took a few ms
// a step. Here each (row, key/value head) is one task: its keys and values are read once for
// all G heads (blocks of 4 query heads), in one pass (the AVX2 section says how the loops meet
// the memory; the portable loops take the scores, the softmax, then the values). float32
// throughout, like SDPA's CPU kernel; the result differs from a float64 reference by float32
// roundings only.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "products.h"
#include "simd.h"

namespace {

using namespace tramontane;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Head {
  const float* q;       // (G, hd) float32, contiguous
  const void* keys;     // row s at keys + s * stride (elements)
  const void* values;
  int64_t stride;       // elements between two slots
  const bool* allowed;  // (S,)
  float* out;           // (G, hd)
};

// ------------------------------------------------------------------------------------------
// Portable loops

template <typename T>
void attend(const Head& h, int64_t groups, int64_t S, int64_t hd, float scale, float* scores) {
  const T* keys = static_cast<const T*>(h.keys);
  const T* values = static_cast<const T*>(h.values);
  for (int64_t g = 0; g < groups; ++g) {
    float* row = scores + g * S;
    float top = kNegInf;
    for (int64_t s = 0; s < S; ++s) {
      if (!h.allowed[s]) {
        row[s] = kNegInf;
        continue;
      }
      float dot = 0.f;
      for (int64_t i = 0; i < hd; ++i) dot += h.q[g * hd + i] * to_float(keys[s * h.stride + i]);
      row[s] = dot * scale;
      top = std::max(top, row[s]);
    }
    float total = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      row[s] = h.allowed[s] ? std::exp(row[s] - top) : 0.f;
      total += row[s];
    }
    float* out = h.out + g * hd;
    std::fill(out, out + hd, 0.f);
    if (total == 0.f) continue;  // nothing allowed: zeros
    for (int64_t s = 0; s < S; ++s) {
      if (row[s] == 0.f) continue;
      const float p = row[s] / total;
      for (int64_t i = 0; i < hd; ++i) out[i] += p * to_float(values[s * h.stride + i]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// AVX2 + FMA (hd a multiple of 16)

#ifdef TRAMONTANE_X86

// Where the time goes at a completion prompt's ~2k positions: the keys and values come from
// memory (every layer's, every step: the weights streamed in between evict them). So one pass
// takes both, by blocks of kSpan positions (online softmax): a block's scores, their
// exponentials against the running maximum (the sums and outputs so far rescaled when it
// rises), then its values, the block's rows in L1 for each of the output passes. The scores'
// loop prefetches the keys and the values kAhead positions ahead, so both are read while
// there is arithmetic to do. A row of bfloat16 is read 16 values a load: its even elements
// shifted up and its odd ones masked are two vectors of float32 without widening across lanes
// (`load16`, simd.h); the queries and the output accumulators are laid out to match
// (`arranged`). Against two passes (all the scores, then all the values): the int4 step at
// ~1.5k positions 9.0 -> 8.2 ms (`benchmarks/compiled_step_ab.py`); prefetching a whole block
// ahead instead of kAhead positions was no better (1.04x).
constexpr int64_t kAhead = 16;
constexpr int64_t kSpan = 64;

template <typename T>
TRAMONTANE_AVX2 inline void prefetch_row(const T* row, int64_t hd) {
  for (int64_t b = 0; b < hd * static_cast<int64_t>(sizeof(T)); b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
  }
}

// The four sums of v0..v3's lanes.
TRAMONTANE_AVX2 inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Scores of up to 4 query heads (q: G4 arranged rows) against the allowed keys of positions
// s0..s1 (scores[g * kSpan + s - s0]; -inf where not allowed); two chains per head (a's lanes
// and b's) halve the dependent additions of a dot product.
template <typename T, int G4>
TRAMONTANE_AVX2 void scores_block(const Head& h, const float* q, int64_t s0, int64_t s1,
                                  int64_t S, int64_t hd, float scale, float* scores) {
  const T* keys = static_cast<const T*>(h.keys);
  const T* values = static_cast<const T*>(h.values);
  for (int64_t s = s0; s < s1; ++s) {
    const T* k = keys + s * h.stride;
    if (s + kAhead < S) {
      prefetch_row(k + kAhead * h.stride, hd);
      prefetch_row(values + (s + kAhead) * h.stride, hd);
    }
    float* at = scores + (s - s0);
    if (!h.allowed[s]) {
      for (int g = 0; g < G4; ++g) at[g * kSpan] = kNegInf;
      continue;
    }
    __m256 acc[4], odd[4];
    for (int g = 0; g < 4; ++g) acc[g] = odd[g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; i += 16) {
      __m256 a, b;
      load16(k + i, a, b);
      for (int g = 0; g < G4; ++g) {
        acc[g] = _mm256_fmadd_ps(a, _mm256_loadu_ps(q + g * hd + i), acc[g]);
        odd[g] = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + g * hd + i + 8), odd[g]);
      }
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, hsum4(_mm256_add_ps(acc[0], odd[0]), _mm256_add_ps(acc[1], odd[1]),
                             _mm256_add_ps(acc[2], odd[2]), _mm256_add_ps(acc[3], odd[3])));
    for (int g = 0; g < G4; ++g) at[g * kSpan] = sums[g] * scale;
  }
}

TRAMONTANE_AVX2 float row_max(const float* row, int64_t n) {
  __m256 vmax = _mm256_set1_ps(kNegInf);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + s));
  float top = hmax(vmax);
  for (; s < n; ++s) top = std::max(top, row[s]);
  return top;
}

// row[s] = exp(row[s] - top) in place (-inf, a slot not allowed, gives 0; top is finite);
// returns their sum.
TRAMONTANE_AVX2 float exp_row(float* row, int64_t n, float top) {
  const __m256 vtop = _mm256_set1_ps(top), ninf = _mm256_set1_ps(kNegInf);
  __m256 vsum = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 x = _mm256_loadu_ps(row + s);
    const __m256 keep = _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, vtop)), keep);
    _mm256_storeu_ps(row + s, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = hsum(vsum);
  for (; s < n; ++s) {
    row[s] = row[s] == kNegInf ? 0.f : std::exp(row[s] - top);
    total += row[s];
  }
  return total;
}

// acc[g] += sum_s p[g][s - s0] v[s] over positions s0..s1, for up to 4 heads: 16 outputs at
// a time (2 x G4 chains; acc arranged), each a pass over the block's rows, in L1.
template <typename T, int G4>
TRAMONTANE_AVX2 void values_block(const Head& h, const float* probs, int64_t s0, int64_t s1,
                                  int64_t hd, float* acc) {
  const T* values = static_cast<const T*>(h.values);
  for (int64_t c = 0; c < hd; c += 16) {
    __m256 lo[G4], hi[G4];
    for (int g = 0; g < G4; ++g) {
      lo[g] = _mm256_loadu_ps(acc + g * hd + c);
      hi[g] = _mm256_loadu_ps(acc + g * hd + c + 8);
    }
    for (int64_t s = s0; s < s1; ++s) {
      if (!h.allowed[s]) continue;
      __m256 a, b;
      load16(values + s * h.stride + c, a, b);
      for (int g = 0; g < G4; ++g) {
        const __m256 p = _mm256_broadcast_ss(probs + g * kSpan + (s - s0));
        lo[g] = _mm256_fmadd_ps(p, a, lo[g]);
        hi[g] = _mm256_fmadd_ps(p, b, hi[g]);
      }
    }
    for (int g = 0; g < G4; ++g) {
      _mm256_storeu_ps(acc + g * hd + c, lo[g]);
      _mm256_storeu_ps(acc + g * hd + c + 8, hi[g]);
    }
  }
}

// Query heads g0..g0+G4 of one key/value head. scratch: G4 x hd arranged queries, G4 x hd
// accumulators, G4 x kSpan scores.
template <typename T, int G4>
TRAMONTANE_AVX2 void attend_block(const Head& h, int64_t g0, int64_t S, int64_t hd, float scale,
                                  float* scratch) {
  float* q = scratch;
  float* acc = q + G4 * hd;
  float* probs = acc + G4 * hd;
  for (int g = 0; g < G4; ++g) {
    for (int64_t i = 0; i < hd; ++i) q[g * hd + arranged<T>(i)] = h.q[(g0 + g) * hd + i];
  }
  std::fill(acc, acc + G4 * hd, 0.f);
  float top[G4], total[G4];
  for (int g = 0; g < G4; ++g) top[g] = kNegInf, total[g] = 0.f;
  for (int64_t s0 = 0; s0 < S; s0 += kSpan) {
    const int64_t s1 = std::min(S, s0 + kSpan);
    scores_block<T, G4>(h, q, s0, s1, S, hd, scale, probs);
    for (int g = 0; g < G4; ++g) {
      float* row = probs + g * kSpan;
      const float high = row_max(row, s1 - s0);
      if (high == kNegInf) {  // nothing allowed in this block: its values are skipped
        continue;
      }
      if (high > top[g]) {  // the outputs and sum so far, against the new maximum
        const float factor = top[g] == kNegInf ? 0.f : std::exp(top[g] - high);
        for (int64_t i = 0; i < hd; ++i) acc[g * hd + i] *= factor;
        total[g] *= factor;
        top[g] = high;
      }
      total[g] += exp_row(row, s1 - s0, top[g]);
    }
    values_block<T, G4>(h, probs, s0, s1, hd, acc);
  }
  float* out = h.out + g0 * hd;
  for (int g = 0; g < G4; ++g) {
    const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;  // nothing allowed: zeros
    for (int64_t i = 0; i < hd; ++i) out[g * hd + i] = acc[g * hd + arranged<T>(i)] * inv;
  }
}

template <typename T>
TRAMONTANE_AVX2 void attend_avx2(const Head& h, int64_t groups, int64_t S, int64_t hd,
                                 float scale, float* scratch) {
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) attend_block<T, 4>(h, g, S, hd, scale, scratch);
  switch (groups - g) {
    case 3: attend_block<T, 3>(h, g, S, hd, scale, scratch); break;
    case 2: attend_block<T, 2>(h, g, S, hd, scale, scratch); break;
    case 1: attend_block<T, 1>(h, g, S, hd, scale, scratch); break;
    default: break;
  }
}

#endif

// ------------------------------------------------------------------------------------------

}  // namespace

namespace tramontane {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& keys, at::Tensor& values, const at::Tensor& slot,
                            const at::Tensor& allowed) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4,
              "decode_attention: expected q (B, Hkv, G, hd) and keys, values (B, Hkv, S, hd)");
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), hd = q.size(3);
  const int64_t S = keys.size(2);
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) == B && keys.size(1) == Hkv &&
                  keys.size(3) == hd,
              "decode_attention: keys ", keys.sizes(), " and values ", values.sizes(),
              " do not match q ", q.sizes());
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
              "decode_attention: keys and values must both be float32 or bfloat16");
  TORCH_CHECK(keys.device().is_cpu() && values.device().is_cpu() && q.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 &&
                  keys.strides() == values.strides(),
              "decode_attention: the last dimension of keys and values must be contiguous, "
              "with the same strides for both");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.numel() == B * S,
              "decode_attention: expected a (B, S) boolean mask of ", B * S, " values");
  TORCH_CHECK(k.numel() == B * Hkv * hd && v.numel() == B * Hkv * hd && slot.numel() == B,
              "decode_attention: expected a new key and value of ", B * Hkv * hd,
              " values and ", B, " slots");
  // The new key and value go into their slots, and the query is read as float32, in place
  // where the layouts allow: a tensor op here costs a dispatch each, several per layer and step.
  const at::Tensor slots = slot.scalar_type() == at::kLong && slot.is_contiguous()
                               ? slot
                               : slot.to(at::kLong).contiguous();
  const int64_t* slot_at = slots.data_ptr<int64_t>();
  const bool raw_write = k.is_contiguous() && v.is_contiguous() &&
                         k.scalar_type() == keys.scalar_type() &&
                         v.scalar_type() == keys.scalar_type();
  const int64_t elem = keys.scalar_type() == at::kBFloat16 ? 2 : 4;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t at_slot = slot_at[b];
    if (at_slot < 0) continue;
    TORCH_CHECK(at_slot < S, "decode_attention: slot ", at_slot, " is past the ", S,
                " slots in use");
    if (!raw_write) {
      const at::Tensor knew = k.reshape({B, Hkv, hd}), vnew = v.reshape({B, Hkv, hd});
      keys.select(0, b).select(1, at_slot).copy_(knew.select(0, b));
      values.select(0, b).select(1, at_slot).copy_(vnew.select(0, b));
      continue;
    }
    for (int64_t kv = 0; kv < Hkv; ++kv) {
      const int64_t from = ((b * Hkv + kv) * hd) * elem;
      const int64_t to = b * keys.stride(0) + kv * keys.stride(1) + at_slot * keys.stride(2);
      std::memcpy(static_cast<char*>(keys.data_ptr()) + to * elem,
                  static_cast<const char*>(k.data_ptr()) + from, hd * elem);
      std::memcpy(static_cast<char*>(values.data_ptr()) + to * elem,
                  static_cast<const char*>(v.data_ptr()) + from, hd * elem);
    }
  }
  const Float32Values q32(q);
  const float* qp = q32.data();
  const at::Tensor mask = allowed.is_contiguous() ? allowed : allowed.contiguous();
  at::Tensor out = at::empty({B, Hkv, G, hd}, q.options().dtype(at::kFloat));
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const bool bf16 = keys.scalar_type() == at::kBFloat16;
  const auto* kp = static_cast<const char*>(keys.data_ptr());
  const auto* vp = static_cast<const char*>(values.data_ptr());
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
#ifdef TRAMONTANE_X86
  const bool avx2 = has_avx2() && hd % 16 == 0;
#endif
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
#ifdef TRAMONTANE_X86
    std::vector<float> scratch(avx2 ? 8 * hd + 4 * kSpan : G * S);
#else
    std::vector<float> scratch(G * S);
#endif
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, kv = t % Hkv;
      const Head h{qp + t * G * hd,
                   kp + (b * keys.stride(0) + kv * keys.stride(1)) * elem,
                   vp + (b * values.stride(0) + kv * values.stride(1)) * elem,
                   keys.stride(2), mp + b * S, op + t * G * hd};
#ifdef TRAMONTANE_X86
      if (avx2) {
        if (bf16) attend_avx2<uint16_t>(h, G, S, hd, scale, scratch.data());
        else attend_avx2<float>(h, G, S, hd, scale, scratch.data());
        continue;
      }
#endif
      if (bf16) attend<uint16_t>(h, G, S, hd, scale, scratch.data());
      else attend<float>(h, G, S, hd, scale, scratch.data());
    }
  });
  return out;
}

}  // namespace tramontane

TORCH_LIBRARY_FRAGMENT(tramontane, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, "
        "Tensor slot, Tensor allowed) -> Tensor");
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("decode_attention", &tramontane::decode_attention);
}
