// The loops of the decode step's attention (decode_attention.cpp's op runs them): one key/value
// head of one row, its G query heads over the S slots of the cache, on raw pointers. The
// portable loops; the AVX2 + FMA ones; and, for bfloat16 caches where the CPU has AVX512-BF16,
// scores by BF16 dot products and values 16 float32 lanes an instruction. Only
// decode_attention.cpp includes it.
//
// float32 throughout, like SDPA's CPU kernel; the result differs from a float64 reference by
// float32 roundings only.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "simd.h"

namespace tramontane::attention {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// New tokens of one row attended in one pass over the cache, at most (the native step's rows).
constexpr int64_t kMaxTokens = 16;

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

// The part of a block's scores loop both instruction sets share, for position s: the keys and
// values kAhead positions on prefetched, and false (its scores -inf) where s is not allowed.
template <typename T, int G4>
TRAMONTANE_AVX2 inline bool take_slot(const Head& h, int64_t s, int64_t s0, int64_t S,
                                      int64_t hd, float* scores) {
  const T* keys = static_cast<const T*>(h.keys);
  const T* values = static_cast<const T*>(h.values);
  if (s + kAhead < S) {
    prefetch_row(keys + (s + kAhead) * h.stride, hd);
    prefetch_row(values + (s + kAhead) * h.stride, hd);
  }
  if (h.allowed[s]) return true;
  for (int g = 0; g < G4; ++g) scores[g * kSpan + (s - s0)] = kNegInf;
  return false;
}

// Scores of up to 4 query heads (q: G4 arranged rows) against the allowed keys of positions
// s0..s1 (scores[g * kSpan + s - s0]; -inf where not allowed); two chains per head (a's lanes
// and b's) halve the dependent additions of a dot product.
template <typename T, int G4>
TRAMONTANE_AVX2 void scores_block(const Head& h, const float* q, int64_t s0, int64_t s1,
                                  int64_t S, int64_t hd, float scale, float* scores) {
  const T* keys = static_cast<const T*>(h.keys);
  for (int64_t s = s0; s < s1; ++s) {
    if (!take_slot<T, G4>(h, s, s0, S, hd, scores)) continue;
    const T* k = keys + s * h.stride;
    float* at = scores + (s - s0);
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

// A block's scores (G4 rows of kSpan, n in use) into the online softmax: each row's maximum
// against the running one `top` (the accumulators, G4 x hd, and the sums so far rescaled when
// it rises), then the exponentials, in place, added to `total`. A row with nothing allowed in
// the block keeps its -inf: the values' loops skip slots that are not allowed.
template <int G4>
TRAMONTANE_AVX2 void softmax_block(float* probs, int64_t n, int64_t hd, float* top, float* total,
                                   float* acc) {
  for (int g = 0; g < G4; ++g) {
    float* row = probs + g * kSpan;
    const float high = row_max(row, n);
    if (high == kNegInf) continue;
    if (high > top[g]) {
      const float factor = top[g] == kNegInf ? 0.f : std::exp(top[g] - high);
      for (int64_t i = 0; i < hd; ++i) acc[g * hd + i] *= factor;
      total[g] *= factor;
      top[g] = high;
    }
    total[g] += exp_row(row, n, top[g]);
  }
}

// ------------------------------------------------------------------------------------------
// AVX-512 with BF16: bfloat16 caches and queries that are bfloat16 values (a bfloat16 model's),
// hd a multiple of 32.
//
// At ~2k positions the AVX2 loops above ran at ~23 GB/s with the keys and values in cache
// (G = 4, hd = 64, 12 layers, `benchmarks/kernels.py`'s attention row): bound by instructions,
// ~120 a position and key/value head, not by memory. Here a key row of 32 values takes one
// `dpbf16ps` per query head (the exact products of bfloat16 pairs summed into float32 lanes:
// the AVX2 loop's sum in another order), and the values 16 float32 lanes an FMA, four query
// heads and 64 outputs in registers for each row read (the AVX2 loop's sums, in its order).

// The four sums of v0..v3's lanes.
TRAMONTANE_AVX512 inline __m256 fold_halves(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

TRAMONTANE_AVX512 inline __m128 hsum4_zmm(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  return hsum4(fold_halves(v0), fold_halves(v1), fold_halves(v2), fold_halves(v3));
}

// Scores of up to 4 query heads (q: G4 rows of hd bfloat16, in order) against the allowed keys
// of positions s0..s1, as `scores_block` lays them out.
template <int G4>
TRAMONTANE_AVX512_BF16 void scores_block_dot(const Head& h, const uint16_t* q, int64_t s0,
                                             int64_t s1, int64_t S, int64_t hd, float scale,
                                             float* scores) {
  const uint16_t* keys = static_cast<const uint16_t*>(h.keys);
  const __m128 vscale = _mm_set1_ps(scale);
  for (int64_t s = s0; s < s1; ++s) {
    if (!take_slot<uint16_t, G4>(h, s, s0, S, hd, scores)) continue;
    const uint16_t* k = keys + s * h.stride;
    float* at = scores + (s - s0);
    __m512 acc[4];
    for (int g = 0; g < 4; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < hd; i += 32) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + i);
      for (int g = 0; g < G4; ++g) {
        acc[g] = _mm512_dpbf16_ps(acc[g], kv, (__m512bh)_mm512_loadu_si512(q + g * hd + i));
      }
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, _mm_mul_ps(hsum4_zmm(acc[0], acc[1], acc[2], acc[3]), vscale));
    for (int g = 0; g < G4; ++g) at[g * kSpan] = sums[g];
  }
}

// acc[g] += sum_s p[g][s - s0] v[s] for up to 4 heads, over columns c..c + 32 NB: a row's 32
// bfloat16 values are its even elements shifted up and its odd ones masked, so acc holds each
// block of 32 outputs as its 16 even ones, then its 16 odd ones (`arranged32`).
template <int G4, int NB>
TRAMONTANE_AVX512 void values_pass(const Head& h, const float* probs, int64_t s0, int64_t s1,
                                   int64_t c, int64_t hd, float* acc) {
  const uint16_t* values = static_cast<const uint16_t*>(h.values);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 lo[G4][NB], hi[G4][NB];
  for (int g = 0; g < G4; ++g) {
    for (int n = 0; n < NB; ++n) {
      lo[g][n] = _mm512_loadu_ps(acc + g * hd + c + 32 * n);
      hi[g][n] = _mm512_loadu_ps(acc + g * hd + c + 32 * n + 16);
    }
  }
  for (int64_t s = s0; s < s1; ++s) {
    if (!h.allowed[s]) continue;
    const uint16_t* row = values + s * h.stride + c;
    __m512 a[NB], b[NB];
    for (int n = 0; n < NB; ++n) {
      const __m512i v = _mm512_loadu_si512(row + 32 * n);
      a[n] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      b[n] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    for (int g = 0; g < G4; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g * kSpan + (s - s0)]);
      for (int n = 0; n < NB; ++n) {
        lo[g][n] = _mm512_fmadd_ps(p, a[n], lo[g][n]);
        hi[g][n] = _mm512_fmadd_ps(p, b[n], hi[g][n]);
      }
    }
  }
  for (int g = 0; g < G4; ++g) {
    for (int n = 0; n < NB; ++n) {
      _mm512_storeu_ps(acc + g * hd + c + 32 * n, lo[g][n]);
      _mm512_storeu_ps(acc + g * hd + c + 32 * n + 16, hi[g][n]);
    }
  }
}

template <int G4>
TRAMONTANE_AVX512 void values_block_zmm(const Head& h, const float* probs, int64_t s0,
                                        int64_t s1, int64_t hd, float* acc) {
  int64_t c = 0;
  for (; c + 64 <= hd; c += 64) values_pass<G4, 2>(h, probs, s0, s1, c, hd, acc);
  if (c < hd) values_pass<G4, 1>(h, probs, s0, s1, c, hd, acc);
}

inline int64_t arranged32(int64_t i) {
  const int64_t j = i % 32;
  return i - j + (j % 2 == 0 ? j / 2 : 16 + j / 2);
}

// ------------------------------------------------------------------------------------------
// One pass over the cache for query heads g0..g0+G4 of one key/value head, by blocks of kSpan
// positions: a block's scores, the online softmax, its values. `kDot`: AVX512-BF16's loops
// (bfloat16 T), else AVX2's. A pass's state (`Pass`): G4 x hd accumulators, G4 x hd queries
// in the loops' layout, each head's running maximum and sum; the block's scores are scratch
// of G4 x kSpan that passes may share.

struct Pass {
  float* acc;  // G4 x hd
  float* q;    // G4 x hd: the queries as the loops read them (kDot: bfloat16, in order)
  float top[4], total[4];
};

template <typename T, int G4, bool kDot>
TRAMONTANE_AVX2 void pass_begin(const Head& h, int64_t g0, int64_t hd, Pass& p) {
  uint16_t* qb = reinterpret_cast<uint16_t*>(p.q);
  for (int g = 0; g < G4; ++g) {
    for (int64_t i = 0; i < hd; ++i) {
      const float x = h.q[(g0 + g) * hd + i];
      if constexpr (kDot) {
        uint32_t bits;
        std::memcpy(&bits, &x, sizeof(bits));
        qb[g * hd + i] = static_cast<uint16_t>(bits >> 16);  // exact: a bfloat16 value
      } else {
        p.q[g * hd + arranged<T>(i)] = x;
      }
    }
  }
  std::fill(p.acc, p.acc + G4 * hd, 0.f);
  for (int g = 0; g < G4; ++g) p.top[g] = kNegInf, p.total[g] = 0.f;
}

// Positions s0..s1 of the cache into the pass.
template <typename T, int G4, bool kDot>
TRAMONTANE_AVX2 void pass_block(const Head& h, int64_t s0, int64_t s1, int64_t S, int64_t hd,
                                float scale, Pass& p, float* probs) {
  if constexpr (kDot) {
    scores_block_dot<G4>(h, reinterpret_cast<const uint16_t*>(p.q), s0, s1, S, hd, scale,
                         probs);
  } else {
    scores_block<T, G4>(h, p.q, s0, s1, S, hd, scale, probs);
  }
  softmax_block<G4>(probs, s1 - s0, hd, p.top, p.total, p.acc);
  if constexpr (kDot) {
    values_block_zmm<G4>(h, probs, s0, s1, hd, p.acc);
  } else {
    values_block<T, G4>(h, probs, s0, s1, hd, p.acc);
  }
}

template <typename T, int G4, bool kDot>
TRAMONTANE_AVX2 void pass_end(const Head& h, int64_t g0, int64_t hd, const Pass& p) {
  float* out = h.out + g0 * hd;
  for (int g = 0; g < G4; ++g) {
    const float inv = p.total[g] > 0.f ? 1.f / p.total[g] : 0.f;  // nothing allowed: zeros
    for (int64_t i = 0; i < hd; ++i) {
      out[g * hd + i] = p.acc[g * hd + (kDot ? arranged32(i) : arranged<T>(i))] * inv;
    }
  }
}

// Floats of scratch for `n` tokens' passes (`attend_vector`: n = 1).
inline int64_t scratch_floats(int64_t hd, int64_t n = 1) { return n * 8 * hd + 4 * kSpan; }

// Query heads g0..g0+G4 of `n` tokens (heads[t]: the same keys and values, each token's
// queries, mask and output), block by block: each block of the cache is read from memory for
// the first token and from L1 for the others. Each token's sums are those of a pass of its
// own (the same calls in the same order).
template <typename T, int G4, bool kDot>
TRAMONTANE_AVX2 void attend_block(const Head* heads, int64_t n, int64_t g0, int64_t S,
                                  int64_t hd, float scale, float* scratch) {
  float* probs = scratch;
  Pass passes[kMaxTokens];
  for (int64_t t = 0; t < n; ++t) {
    passes[t].acc = probs + G4 * kSpan + t * 8 * hd;
    passes[t].q = passes[t].acc + G4 * hd;
    pass_begin<T, G4, kDot>(heads[t], g0, hd, passes[t]);
  }
  for (int64_t s0 = 0; s0 < S; s0 += kSpan) {
    const int64_t s1 = std::min(S, s0 + kSpan);
    for (int64_t t = 0; t < n; ++t) {
      pass_block<T, G4, kDot>(heads[t], s0, s1, S, hd, scale, passes[t], probs);
    }
  }
  for (int64_t t = 0; t < n; ++t) pass_end<T, G4, kDot>(heads[t], g0, hd, passes[t]);
}

// Every query head of one key/value head for `n` tokens (1 to kMaxTokens), by blocks of four.
template <typename T, bool kDot>
TRAMONTANE_AVX2 void attend_vector(const Head* heads, int64_t n, int64_t groups, int64_t S,
                                   int64_t hd, float scale, float* scratch) {
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) attend_block<T, 4, kDot>(heads, n, g, S, hd, scale, scratch);
  switch (groups - g) {
    case 3: attend_block<T, 3, kDot>(heads, n, g, S, hd, scale, scratch); break;
    case 2: attend_block<T, 2, kDot>(heads, n, g, S, hd, scale, scratch); break;
    case 1: attend_block<T, 1, kDot>(heads, n, g, S, hd, scale, scratch); break;
    default: break;
  }
}

#endif

}  // namespace tramontane::attention
