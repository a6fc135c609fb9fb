// An input row as each product loop reads it (products.cpp's `products` prepares each input row
// once per call, for all its weights): int16 codes of one scale for the int8 loops, int8 codes
// and group sums for the int4 loops, the order `bf16_rows_avx2` loads its weights in, and the
// row as bfloat16 for `bf16_rows_dot`. Only products.cpp includes it.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "product_loops.h"
#include "simd.h"

namespace tramontane::loops {

// A row as int16 codes of one scale: x ~ code * scale; in order for AVX-512, and on AVX2 each
// full block of 32 laid out as `int8_rows_avx2` reads it (inputs 0-7, 16-23, 8-15, 24-31).
inline AlignedVector<int16_t> quantize_row(const float* x, int64_t k, float* scale, Isa isa) {
  AlignedVector<int16_t> out(k);
#ifdef TRAMONTANE_X86
  if (isa >= Isa::kAvx2) {
    const float amax = amax_avx2(x, k);
    *scale = amax > 0.f ? amax / 32767.f : 1.f;
    int16_codes_avx2(x, k, *scale, out.data());
    // as `int8_rows_avx2` unpacks the weights
    for (int64_t b = 0; isa == Isa::kAvx2 && b + 32 <= k; b += 32) {
      int16_t block[32];
      for (int j = 0; j < 8; ++j) {
        block[j] = out[b + j];
        block[8 + j] = out[b + 16 + j];
        block[16 + j] = out[b + 8 + j];
        block[24 + j] = out[b + 24 + j];
      }
      std::memcpy(out.data() + b, block, sizeof(block));
    }
    return out;
  }
#endif
  (void)isa;
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  *scale = amax > 0.f ? amax / 32767.f : 1.f;
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<int16_t>(std::nearbyint(x[i] / *scale));
  return out;
}

// One input row as the int4 loops take it: the sum of each group's inputs (float32); for the
// portable loops its even and odd inputs, for AVX2 and AVX-512 (groups of 32) its int8 codes,
// one scale per group (laid out as `even_codes` says, by blocks of 2 or 4 groups).
struct Int4Row {
  AlignedVector<float> xe, xo, gsum, xscale;
  AlignedVector<int8_t> codes;
};

inline Int4Row int4_row(const float* x, int64_t k, int64_t group, Isa isa) {
  Int4Row row;
  row.gsum.assign(k / group, 0.f);
#ifdef TRAMONTANE_X86
  if (isa >= Isa::kAvx2) {  // the vector loops take groups of 32 (`int4_isa`)
    row.xscale.resize(k / 32);
    row.codes.resize(k);
    int4_codes_avx2(x, k / 32, isa == Isa::kAvx512 ? 4 : 2, row.codes.data(),
                    row.xscale.data(), row.gsum.data());
    return row;
  }
#endif
  for (int64_t i = 0; i < k; ++i) row.gsum[i / group] += x[i];
  row.xe.resize(k / 2);  // the portable loops
  row.xo.resize(k / 2);
  for (int64_t j = 0; j < k / 2; ++j) {
    row.xe[j] = x[2 * j];
    row.xo[j] = x[2 * j + 1];
  }
  return row;
}

// An input row as `bf16_rows_avx2` reads it: each full block of 16 inputs as its 8 even ones,
// then its 8 odd ones; the last k % 16 in place.
inline AlignedVector<float> arranged_row(const float* x, int64_t k) {
  AlignedVector<float> out(x, x + k);
  for (int64_t i = 0; i < k - k % 16; ++i) out[arranged<uint16_t>(i)] = x[i];
  return out;
}

// An input row as bfloat16, if every value is one (a bfloat16 model's activations): what
// `bf16_rows_dot` takes; empty otherwise.
inline AlignedVector<uint16_t> bf16_row(const float* x, int64_t k) {
  AlignedVector<uint16_t> out(k);
  for (int64_t i = 0; i < k; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    if ((bits & 0xffffu) != 0) return {};
    out[i] = static_cast<uint16_t>(bits >> 16);
  }
  return out;
}

}  // namespace tramontane::loops
