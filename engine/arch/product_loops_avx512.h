// The AVX-512 loops of the products (products.cpp's `products` runs them), beside
// product_loops.h's portable and AVX2 ones: rows r0..r1 of one weight against 1 to 4 input rows
// at once, on raw pointers. Only products.cpp includes it.

#pragma once

#include <algorithm>
#include <cstdint>

#include "product_loops.h"
#include "simd.h"

namespace tramontane::loops {

// AVX-512 (F, BW, VL, DQ) with VNNI, and BF16 where the CPU has it: the integer loops'
// multiply-and-add-pairs-and-accumulate in one instruction (`dpwssd`, `dpbusd`), their integer
// sums the AVX2 loops' exactly, only the float32 additions of their partial sums in another
// order; bfloat16's pairs in one instruction (`dpbf16ps`).

#ifdef TRAMONTANE_X86

// bfloat16 rows against activations that are bfloat16 values already (a bfloat16 model's), by
// BF16's dot products: `dpbf16ps` adds the exact products of pairs to float32 lanes, so the
// sum is `bf16_rows_avx2`'s, in another order; 16 weights an instruction, no shifts (other
// activation rows take `bf16_rows_avx2`: a 512-bit form of it streamed 76% of one thread's
// read bandwidth against its 89%). xb: the activations as bfloat16, in order. 256-bit (BF16
// with VL): on a Zen 4 the 512-bit form was 5-9% slower in the one-row decode step
// (memory-bound; 32-byte loads stream better there) and 8% faster at 12 rows, where the
// 256-bit form is still 0.70x the AVX2 loop's time.
TRAMONTANE_AVX512_BF16 inline __m256 dot16(__m256 acc, const uint16_t* a, const uint16_t* b) {
  return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)),
                          (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
}

// N input rows at once (1 to 4): each weight load serves all N, from registers, so a few
// rows (a draft being checked, a keystroke's new prompt tokens) cost little more than one;
// each input row's sums are added in the one-row order, so its results are the same bits
// whatever N it was computed with.
template <int N>
TRAMONTANE_AVX512_BF16 inline void bf16_rows_dot_n(const uint16_t* w,
                                                   const uint16_t* const* xb, float* const* y,
                                                   int64_t k, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * k;
    __m256 a[N][4];
    for (int n = 0; n < N; ++n) {
      for (int j = 0; j < 4; ++j) a[n][j] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
      stream_ahead(row + i);
      stream_ahead(row + i + 32);
      for (int j = 0; j < 4; ++j) {
        const __m256bh wj =
            (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i + 16 * j));
        for (int n = 0; n < N; ++n) {
          a[n][j] = _mm256_dpbf16_ps(
              a[n][j], wj,
              (__m256bh)_mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(xb[n] + i + 16 * j)));
        }
      }
    }
    for (int n = 0; n < N; ++n) {
      int64_t t = i;
      for (; t + 16 <= k; t += 16) a[n][0] = dot16(a[n][0], row + t, xb[n] + t);
      float acc =
          hsum(_mm256_add_ps(_mm256_add_ps(a[n][0], a[n][1]), _mm256_add_ps(a[n][2], a[n][3])));
      for (; t < k; ++t) acc += bf16_to_float(row[t]) * bf16_to_float(xb[n][t]);
      y[n][r] = acc;
    }
  }
}

TRAMONTANE_AVX512_BF16 inline void bf16_rows_dot(const uint16_t* w, const uint16_t* xb,
                                                 float* y, int64_t k, int64_t r0, int64_t r1) {
  bf16_rows_dot_n<1>(w, &xb, &y, k, r0, r1);
}

// int8 rows: the weights sign-extended to int16 (32 a load, in order), `dpwssd` multiplies
// them by the int16 activations (`quantize_row`, in order) and adds pairs into int32 lanes.
// Lanes go back to float every 2048 inputs: at most 128 products of |127 * 32767| per lane
// of the two accumulators' sum. N input rows at once (1 to 4), as `bf16_rows_dot_n`: each
// widened weight serves all N, and each row's sums are the one-row loop's, in its order.
template <int N>
TRAMONTANE_AVX512 inline void int8_rows_avx512_n(const int8_t* w, const float* scale,
                                                 const int16_t* const* x16,
                                                 const float* xscale, float* const* y,
                                                 int64_t k, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = w + r * k;
    __m512 facc[N];
    for (int n = 0; n < N; ++n) facc[n] = _mm512_setzero_ps();
    int64_t i = 0;
    while (i + 64 <= k) {
      __m512i a0[N], a1[N];
      for (int n = 0; n < N; ++n) a0[n] = a1[n] = _mm512_setzero_si512();
      const int64_t stop = std::min(k - 63, i + 2048);
      for (; i < stop; i += 64) {
        stream_ahead(row + i);
        const __m512i w0 = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
        const __m512i w1 = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i + 32)));
        for (int n = 0; n < N; ++n) {
          a0[n] = _mm512_dpwssd_epi32(a0[n], w0, _mm512_loadu_si512(x16[n] + i));
          a1[n] = _mm512_dpwssd_epi32(a1[n], w1, _mm512_loadu_si512(x16[n] + i + 32));
        }
      }
      for (int n = 0; n < N; ++n) {
        facc[n] = _mm512_add_ps(facc[n], _mm512_cvtepi32_ps(_mm512_add_epi32(a0[n], a1[n])));
      }
    }
    for (int n = 0; n < N; ++n) {
      int64_t tail = 0;
      for (int64_t t = i; t < k; ++t) tail += static_cast<int64_t>(row[t]) * x16[n][t];
      y[n][r] = (_mm512_reduce_add_ps(facc[n]) + static_cast<float>(tail)) * xscale[n] *
                scale[r];
    }
  }
}

TRAMONTANE_AVX512 inline void int8_rows_avx512(const int8_t* w, const float* scale,
                                               const int16_t* x16, float xscale, float* y,
                                               int64_t k, int64_t r0, int64_t r1) {
  int8_rows_avx512_n<1>(w, scale, &x16, &xscale, &y, k, r0, r1);
}

// int4 rows: a 64-byte load holds 4 groups (16 bytes each), its low nibbles their even inputs
// and its high nibbles their odd ones; the activations' int8 codes come by blocks of 4 groups
// (`int4_codes_avx2(..., 4, ...)`), and `dpbusd` multiplies the unsigned codes by them and adds
// fours into int32 lanes: lanes 4g..4g+3 hold group g's dot product. 16 groups at a time take
// one load of their scales; groups past the last 16 take `group_dot`. N input rows at once
// (1 to 4; `x`: their `Int4Row`s' codes, scales and group sums): each load of codes and scales
// serves all N, each row's sums in the one-row order.
struct Int4Input {
  const int8_t* codes;
  const float* xscale;
  const float* gsum;
};

template <int N, typename S>
TRAMONTANE_AVX512 void int4_rows_avx512_n(const uint8_t* w, const S* scale, const S* zero,
                                          const Int4Input* x, float* const* y, int64_t k,
                                          int64_t r0, int64_t r1) {
  const int64_t groups = k / 32;
  const __m512i low = _mm512_set1_epi8(15);
  // The 16 groups' scales, spread to the 4 lanes of each group of a block of 4.
  __m512i spread[4];
  for (int q = 0; q < 4; ++q) {
    spread[q] = _mm512_setr_epi32(4 * q, 4 * q, 4 * q, 4 * q, 4 * q + 1, 4 * q + 1, 4 * q + 1,
                                  4 * q + 1, 4 * q + 2, 4 * q + 2, 4 * q + 2, 4 * q + 2,
                                  4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 3);
  }
  const __m512 eight = _mm512_set1_ps(8.f);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * (k / 2);
    const S* s = scale + r * groups;
    const S* z = zero + r * groups;
    __m512 acc0[N], acc1[N], off[N];
    for (int n = 0; n < N; ++n) acc0[n] = acc1[n] = off[n] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= groups; g += 16) {
      const __m512 sg = load_zmm(s + g);
      const __m512 shift = _mm512_fnmadd_ps(eight, sg, load_zmm(z + g));
      __m512 both[N];
      for (int n = 0; n < N; ++n) {
        both[n] = _mm512_mul_ps(sg, _mm512_loadu_ps(x[n].xscale + g));
        off[n] = _mm512_fmadd_ps(shift, _mm512_loadu_ps(x[n].gsum + g), off[n]);
      }
      for (int q = 0; q < 4; ++q) {
        stream_ahead(row + (g + 4 * q) * 16);
        const __m512i b = _mm512_loadu_si512(row + (g + 4 * q) * 16);
        const __m512i even = _mm512_and_si512(b, low);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        for (int n = 0; n < N; ++n) {
          const int8_t* c = x[n].codes + (g + 4 * q) * 32;
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(c));
          d = _mm512_dpbusd_epi32(d, odd, _mm512_loadu_si512(c + 64));
          __m512& acc = q % 2 == 0 ? acc0[n] : acc1[n];
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                _mm512_permutexvar_ps(spread[q], both[n]), acc);
        }
      }
    }
    for (int n = 0; n < N; ++n) {
      float tail = 0.f;
      for (int64_t t = g; t < groups; ++t) {
        const float st = to_float(s[t]);
        const int8_t* even = x[n].codes + even_codes(t, 4);
        tail += st * x[n].xscale[t] *
                    group_dot(row + t * 16, even, even + odd_codes(t, groups, 4)) +
                (to_float(z[t]) - 8.f * st) * x[n].gsum[t];
      }
      y[n][r] =
          _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0[n], acc1[n]), off[n])) + tail;
    }
  }
}

template <typename S>
TRAMONTANE_AVX512 void int4_rows_avx512(const uint8_t* w, const S* scale, const S* zero,
                                        const int8_t* codes, const float* xscale,
                                        const float* gsum, float* y, int64_t k, int64_t r0,
                                        int64_t r1) {
  const Int4Input x{codes, xscale, gsum};
  int4_rows_avx512_n<1>(w, scale, zero, &x, &y, k, r0, r1);
}

#endif

}  // namespace tramontane::loops
