// Small helpers shared by the C++ kernels (the products' loops, the attention, the decoder
// layer): bfloat16 to float32 (values and whole tensors), the instruction sets the loops choose
// from, and the AVX2 + FMA loads and reductions. Vector code is compiled per function (`target`
// attributes) and chosen at run time (`isa`), so the library loads anywhere.

#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TRAMONTANE_X86 1
#endif

namespace tramontane {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The vector loops that stream a weight ask for its bytes `stream_ahead_bytes` ahead of where
// they read, one cache line per 64 bytes they consume, into L2 (`prefetcht1`); 0 asks for
// nothing. One value for the library, set at run time (`set_stream_ahead`): the best distance
// depends on the CPU and on the pages the weights are on. A 357 MB bfloat16 product on two
// threads, 4 KiB pages: on an Ice Lake VM (AVX-512 without BF16, 2 vCPU) the hardware
// prefetchers alone read at 70% of a plain sum's rate (14.4-15.6 against 20-21 GB/s),
// prefetching into L1 4 KiB ahead at 97-100% (512 bytes ahead 16.6-17.0 GB/s, 1 KiB 17.7-18.8,
// 2 KiB 18.4-20.1, 8 KiB as 4 KiB; into L2 not measured there). On a Zen 4 VM (2 vCPU)
// prefetching into L1 read slower than nothing (22.5 against 25.6 GB/s, interleaved), into L2
// faster (29.7, the sum 30.5), and 1-16 KiB ahead the same. On that Zen 4 with the weights on
// 2 MiB pages, nothing or 512 bytes-1 KiB ahead read at the sum's rate there (~1.3x the 4 KiB
// pages' sum), 4 KiB ahead at 0.75-0.85x of that. Past the end of a weight it asks for
// whatever follows, which a prefetch may (it never faults).
inline std::atomic<int64_t> stream_ahead_bytes{4096};

inline void stream_ahead(const void* p) {
  const int64_t ahead = stream_ahead_bytes.load(std::memory_order_relaxed);
  if (ahead != 0) __builtin_prefetch(static_cast<const char*>(p) + ahead, 0, 2);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }

// Storage for the operands the vector loops read again and again (an activation row in its
// loops' layout): 64-byte aligned, so that no 64-byte load of it splits across cache lines.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  explicit Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned64<T>>;

// A tensor's values as contiguous float32, without a tensor op where it can (a dispatch per
// call adds up over a step's several kernel calls a layer): read in place when it is float32,
// converted here when it is bfloat16, through `to` otherwise. Not copyable: `data()` may
// point into its own buffer.
class Float32Values {
 public:
  explicit Float32Values(const at::Tensor& x) {
    if (x.is_contiguous() && x.scalar_type() == at::kFloat) {
      data_ = x.data_ptr<float>();
    } else if (x.is_contiguous() && x.scalar_type() == at::kBFloat16) {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
      buffer_.resize(x.numel());
      for (int64_t i = 0; i < x.numel(); ++i) buffer_[i] = bf16_to_float(p[i]);
      data_ = buffer_.data();
    } else {
      converted_ = x.to(at::kFloat).contiguous();
      data_ = converted_.data_ptr<float>();
    }
  }
  Float32Values(const Float32Values&) = delete;
  Float32Values& operator=(const Float32Values&) = delete;
  Float32Values(Float32Values&&) = default;  // the buffer's storage moves with it

  const float* data() const { return data_; }

 private:
  std::vector<float> buffer_;
  at::Tensor converted_;
  const float* data_ = nullptr;
};

// Where element i of a block of 16 sits in `load16`'s two vectors (a's 8 lanes, then b's):
// bfloat16 rows are read as their even elements, then their odd ones; float32 rows in order.
template <typename T>
int64_t arranged(int64_t i) {
  if constexpr (std::is_same_v<T, float>) return i;
  const int64_t j = i % 16;
  return i - j + (j % 2 == 0 ? j / 2 : 8 + j / 2);
}

#ifdef TRAMONTANE_X86

#define TRAMONTANE_AVX2 __attribute__((target("avx2,fma")))

TRAMONTANE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TRAMONTANE_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TRAMONTANE_AVX2 inline __m256 load_bf16(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// Eight values as float32, from float32 or bfloat16 storage.
TRAMONTANE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TRAMONTANE_AVX2 inline __m256 load8(const uint16_t* p) { return load_bf16(p); }

// Sixteen values as two vectors of float32 (`arranged` says which goes where): bfloat16 in
// one 32-byte load, its even elements shifted up and its odd ones masked, with no widening
// across lanes; float32 as elements 0-7 and 8-15.
TRAMONTANE_AVX2 inline void load16(const uint16_t* p, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

TRAMONTANE_AVX2 inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln2/2 (ln 2 in two parts, so that r is exact
// to float32), exp(r) by the Taylor polynomial whose coefficients, highest first, are
// kExpTaylor's: degree 6 from the first (relative error < 2e-7, float32's own rounding), degree
// 5 from the second (< 3e-6).
constexpr float kLog2e = 1.44269504f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpTaylor[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};

// exp(x) for x <= 88 (softmax's shifted scores, the SiLU's -x), by kExpTaylor's degree 6;
// clamped to [-87, 88], where 2^n stays a normal float.
TRAMONTANE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// AVX-512 F/BW/VL/DQ with VNNI (`Isa::kAvx512`); with BF16's dot products (`has_avx512_bf16`).
#define TRAMONTANE_AVX512 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define TRAMONTANE_AVX512_BF16 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))

// Sixteen values as float32, from float32 or bfloat16 storage.
TRAMONTANE_AVX512 inline __m512 load_zmm(const float* p) { return _mm512_loadu_ps(p); }
TRAMONTANE_AVX512 inline __m512 load_zmm(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// exp(x) of 16 lanes for x <= 0 (scores less their maximum), by kExpTaylor's degree 5 (far
// below a bfloat16 rounding); clamped below at -87 (~1e-38), 2^n applied by `scalef`.
TRAMONTANE_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[1]);
  for (int i = 2; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_scalef_ps(p, n);
}

#endif

// The loops' instruction sets, each a superset of the one before: portable C++; AVX2 + FMA;
// AVX-512 with the byte and word instructions and VNNI's integer dot products (Ice Lake and
// later, Zen 4 and later). The best the CPU has runs, unless `cap_isa` lowered it (the tests
// and benchmarks run every level a machine has, in one process).
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa cpu_isa() {
#ifdef TRAMONTANE_X86
  static const Isa best = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::kPortable;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vnni");
    return avx512 ? Isa::kAvx512 : Isa::kAvx2;
  }();
  return best;
#else
  return Isa::kPortable;
#endif
}

// The cap, one for the library (every kernel reads it at each call).
inline std::atomic<int> isa_cap{static_cast<int>(Isa::kAvx512)};

inline Isa isa() {
  return static_cast<Isa>(std::min(static_cast<int>(cpu_isa()), isa_cap.load()));
}
inline void cap_isa(Isa cap) { isa_cap.store(static_cast<int>(cap)); }
inline bool has_avx2() { return isa() >= Isa::kAvx2; }

// The bfloat16 dot products of AVX512-BF16 (Zen 4, Sapphire Rapids), with the AVX-512 loops.
inline bool has_avx512_bf16() {
#ifdef TRAMONTANE_X86
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes && isa() >= Isa::kAvx512;
#else
  return false;
#endif
}

}  // namespace tramontane
