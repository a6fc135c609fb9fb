// The loops of the one-row products (products.cpp's `products` runs them): each computes rows
// r0..r1 of one weight against one input row, on raw pointers. The portable loops, then the
// AVX2 + FMA ones (compiled per function, chosen at run time), and the AVX2 codings of the
// activation rows that the int8 and int4 loops read; the AVX-512 loops are in
// product_loops_avx512.h. products.cpp and input_rows.h include it.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace tramontane::loops {
// ------------------------------------------------------------------------------------------
// Portable loops

// W: bfloat16 (uint16_t) or float32 weights (a float32 model's, in the fused decoder layer).
// Eight sums of every eighth product, as the vector loops keep lanes (a serial sum of 1024
// products was 1.6e-5 off where the lanes are a few 1e-7), and the compiler vectorises them.
template <typename W>
void float_rows(const W* w, const float* x, float* y, int64_t k, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const W* row = w + r * k;
    float lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      for (int j = 0; j < 8; ++j) lanes[j] += to_float(row[i + j]) * x[i + j];
    }
    float acc = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; i < k; ++i) acc += to_float(row[i]) * x[i];
    y[r] = acc;
  }
}

inline void int8_rows(const int8_t* w, const float* scale, const float* x, float* y, int64_t k,
                      int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = w + r * k;
    float acc = 0.f;
    for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(row[i]) * x[i];
    y[r] = acc * scale[r];
  }
}

// xe/xo: the even and odd inputs; gsum: the sum of the inputs of each group. Scales and zeros
// are float32 or bfloat16 (S = uint16_t): a float32 pair per group of 32 would add 0.25 byte
// per weight to the 0.5 of the codes.
template <typename S>
void int4_rows(const uint8_t* w, const S* scale, const S* zero, const float* xe,
               const float* xo, const float* gsum, float* y, int64_t k, int64_t group,
               int64_t r0, int64_t r1) {
  const int64_t groups = k / group, half = group / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * (k / 2);
    float acc = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float dot = 0.f;
      for (int64_t j = g * half; j < (g + 1) * half; ++j) {
        dot += static_cast<float>(row[j] & 15) * xe[j] + static_cast<float>(row[j] >> 4) * xo[j];
      }
      const float s = to_float(scale[r * groups + g]), z = to_float(zero[r * groups + g]);
      acc += s * dot + (z - 8.f * s) * gsum[g];
    }
    y[r] = acc;
  }
}

// The int8 codes of an activation row for the int4 products on AVX2 and AVX-512
// (`int4_row`), by blocks of `block` groups of 32 (AVX2's 32-byte loads take 2 groups of
// weights, AVX-512's 64-byte ones 4): the block's even inputs, group after group, then its odd
// ones; a last block of fewer groups alike. Where group g's even-input codes start, and how far
// on its odd ones:
inline int64_t even_codes(int64_t g, int64_t block) {
  return g / block * block * 32 + g % block * 16;
}
inline int64_t odd_codes(int64_t g, int64_t groups, int64_t block) {
  return std::min(block, groups - g / block * block) * 16;
}

// ------------------------------------------------------------------------------------------
// AVX2 + FMA

#ifdef TRAMONTANE_X86

// float32 weights (a float32 model's, in the fused decoder layer).
TRAMONTANE_AVX2 inline void f32_rows_avx2(const float* w, const float* x, float* y, int64_t k,
                                          int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = w + r * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      stream_ahead(row + i);
      stream_ahead(row + i + 16);
      a0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), a0);
      a1 = _mm256_fmadd_ps(load8(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
      a2 = _mm256_fmadd_ps(load8(row + i + 16), _mm256_loadu_ps(x + i + 16), a2);
      a3 = _mm256_fmadd_ps(load8(row + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), a0);
    float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; ++i) acc += row[i] * x[i];
    y[r] = acc;
  }
}

// bfloat16 rows read 16 weights a load (`load16`), against the activations laid out to
// match (`arranged_row`).
TRAMONTANE_AVX2 inline void bf16_rows_avx2(const uint16_t* w, const float* xa, float* y, int64_t k,
                                           int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 e, o;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      stream_ahead(row + i);
      load16(row + i, e, o);
      a0 = _mm256_fmadd_ps(e, _mm256_loadu_ps(xa + i), a0);
      a1 = _mm256_fmadd_ps(o, _mm256_loadu_ps(xa + i + 8), a1);
      load16(row + i + 16, e, o);
      a2 = _mm256_fmadd_ps(e, _mm256_loadu_ps(xa + i + 16), a2);
      a3 = _mm256_fmadd_ps(o, _mm256_loadu_ps(xa + i + 24), a3);
    }
    for (; i + 16 <= k; i += 16) {
      load16(row + i, e, o);
      a0 = _mm256_fmadd_ps(e, _mm256_loadu_ps(xa + i), a0);
      a1 = _mm256_fmadd_ps(o, _mm256_loadu_ps(xa + i + 8), a1);
    }
    float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; ++i) acc += bf16_to_float(row[i]) * xa[i];
    y[r] = acc;
  }
}

// int8 rows multiply integers: the activation row is quantized to int16 (one scale
// for the row: a relative error of 2^-16 of its largest value, far below bfloat16's 2^-9), the
// weights widened to int16, and pairs of products summed into int32 lanes (`madd`): half the
// instructions of converting every weight to float. Lanes go back to float before they could
// overflow (every 1024 inputs for int8: at most 128 products of |127 * 32767| per lane).
// The weights widen within each 128-bit lane (each byte unpacked with itself, then shifted
// down: inputs 0-7 and 16-23 of a block of 32, then 8-15 and 24-31), which `quantize_row`'s
// layout of the activations matches: single-cycle instructions where sign-extending across
// lanes took four. (Tried: two rows at a time sharing the activations' loads, faster from
// cache but 22 -> 16 GB/s streaming from memory on two threads: two streams per thread.)
TRAMONTANE_AVX2 inline void int8_rows_avx2(const int8_t* w, const float* scale,
                                           const int16_t* x16, float xscale, float* y, int64_t k,
                                           int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = w + r * k;
    __m256 facc = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + 32 <= k) {
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      const int64_t stop = std::min(k - 31, i + 1024);
      for (; i < stop; i += 32) {
        if (i % 64 == 0) stream_ahead(row + i);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(
            _mm256_srai_epi16(_mm256_unpacklo_epi8(b, b), 8),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i))));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(
            _mm256_srai_epi16(_mm256_unpackhi_epi8(b, b), 8),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i + 16))));
      }
      facc = _mm256_add_ps(facc, _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)));
    }
    int64_t tail = 0;
    for (; i < k; ++i) tail += static_cast<int64_t>(row[i]) * x16[i];
    y[r] = (hsum(facc) + static_cast<float>(tail)) * xscale * scale[r];
  }
}

// int4 on AVX2 multiplies bytes: the activation row is quantized to int8 per group of 32 (one
// scale per group, as llama.cpp's q8_0 does for its q4_0 products), and `maddubs` multiplies
// the unsigned codes by the signed activations and adds neighbouring pairs in one instruction.
// Two groups take one 32-byte load: its low nibbles are both groups' even inputs, its high
// nibbles their odd ones, and `int4_row` lays the activations out to match. Per 64 weights
// about 11 instructions, where widening to int16 took 26: the kernel reads at the memory limit
// instead of being bound by its arithmetic.
//
// Per output row: y = sum_g s_g xs_g <q_g, c_g> + sum_g (z_g - 8 s_g) sum(x_g), where c_g are
// the group's int8 codes and xs_g its scale; the second sum takes the float32 inputs.
// <q, c> per int16 lane: at most 4 products of 15 * 127 (7620); per int32 lane, 8.
TRAMONTANE_AVX2 inline __m256i pair_dot(const uint8_t* bytes, const int8_t* codes,
                                        __m256i low, __m256i ones) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i even = _mm256_and_si256(b, low);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
  const __m256i sum = _mm256_add_epi16(
      _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))),
      _mm256_maddubs_epi16(odd,
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32))));
  return _mm256_madd_epi16(sum, ones);  // lanes 0-3: the first group, 4-7: the second
}

TRAMONTANE_AVX2 inline float group_dot(const uint8_t* bytes, const int8_t* even,
                                       const int8_t* odd) {
  const __m128i low = _mm_set1_epi8(15);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i sum = _mm_add_epi16(
      _mm_maddubs_epi16(_mm_and_si128(b, low),
                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(even))),
      _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low),
                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(odd))));
  __m128i d = _mm_madd_epi16(sum, _mm_set1_epi16(1));
  d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0x4e));
  d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0xb1));
  return static_cast<float>(_mm_cvtsi128_si32(d));
}

template <typename S>
TRAMONTANE_AVX2 void int4_rows_avx2(const uint8_t* w, const S* scale, const S* zero,
                                    const int8_t* codes, const float* xscale,
                                    const float* gsum, float* y, int64_t k, int64_t r0,
                                    int64_t r1) {
  const int64_t groups = k / 32;
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  // Lanes of 8 groups' scales, spread to the 4 + 4 lanes of a pair of groups.
  const __m256i spread[4] = {
      _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
      _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * (k / 2);
    const S* s = scale + r * groups;
    const S* z = zero + r * groups;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 off = _mm256_setzero_ps();
    const __m256 eight = _mm256_set1_ps(8.f);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 sg = load8(s + g);
      const __m256 both = _mm256_mul_ps(sg, _mm256_loadu_ps(xscale + g));
      off = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, sg, load8(z + g)),
                            _mm256_loadu_ps(gsum + g), off);
      const uint8_t* b = row + g * 16;
      const int8_t* c = codes + g * 32;
      stream_ahead(b);
      stream_ahead(b + 64);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(b, c, low, ones)),
                             _mm256_permutevar8x32_ps(both, spread[0]), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(b + 32, c + 64, low, ones)),
                             _mm256_permutevar8x32_ps(both, spread[1]), acc1);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(b + 64, c + 128, low, ones)),
                             _mm256_permutevar8x32_ps(both, spread[2]), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(b + 96, c + 192, low, ones)),
                             _mm256_permutevar8x32_ps(both, spread[3]), acc1);
    }
    float tail = 0.f;
    for (; g < groups; ++g) {
      const float sg = to_float(s[g]);
      const int8_t* even = codes + even_codes(g, 2);
      tail += sg * xscale[g] * group_dot(row + g * 16, even, even + odd_codes(g, groups, 2)) +
              (to_float(z[g]) - 8.f * sg) * gsum[g];
    }
    y[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), off)) + tail;
  }
}

// The activation rows' rounding for the int8 and int4 loops, 8 values an instruction where
// the scalar loops took 5-18 us a call at 1-3k inputs (a few percent of a quantized decode
// step). The same roundings: a divide or multiply in float32, then to nearest, ties to even
// (`cvtps` under the default rounding mode, as `nearbyint`).
TRAMONTANE_AVX2 inline float amax_avx2(const float* x, int64_t k) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  float amax = hmax(m);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

TRAMONTANE_AVX2 inline void int16_codes_avx2(const float* x, int64_t k, float scale, int16_t* out) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i), s));
    const __m256i b = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i + 8), s));
    // packs interleaves the two 128-bit lanes: a0-3 b0-3 | a4-7 b4-7; put them in order.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
  }
  for (; i < k; ++i) out[i] = static_cast<int16_t>(std::nearbyint(x[i] / scale));
}

TRAMONTANE_AVX2 inline __m256i rounded(__m256 v, __m256 by) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(v, by));
}

// Groups of 32: each group's sum, scale (max|x| / 127) and int8 codes, laid out by blocks of
// `block` groups as `even_codes` says.
TRAMONTANE_AVX2 inline void int4_codes_avx2(const float* x, int64_t groups, int64_t block,
                                            int8_t* codes, float* xscale, float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * 32;
    const __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8);
    const __m256 v2 = _mm256_loadu_ps(xg + 16), v3 = _mm256_loadu_ps(xg + 24);
    gsum[g] = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    const float amax = hmax(_mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
        _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3))));
    const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    xscale[g] = amax / 127.f;
    // Two packs leave the 32 codes as dwords of four in the order 0 2 4 6 1 3 5 7: put them
    // back in order, then each lane's even codes before its odd ones, then the two lanes'
    // evens together.
    __m256i c = _mm256_packs_epi16(
        _mm256_packs_epi32(rounded(v0, inverse), rounded(v1, inverse)),
        _mm256_packs_epi32(rounded(v2, inverse), rounded(v3, inverse)));
    c = _mm256_permutevar8x32_epi32(c, order);
    c = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(c, split), 0xD8);
    int8_t* even = codes + even_codes(g, block);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm256_castsi256_si128(c));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(even + odd_codes(g, groups, block)),
                     _mm256_extracti128_si256(c, 1));
  }
}

#endif

}  // namespace tramontane::loops
