// A prompt chunk's grouped-query attention over the keys it may see, for bfloat16 models on CPUs
// with AVX512-BF16 (`attention.chunk_attention` calls it where `prefill_attention_here()`; SDPA
// runs everywhere else):
//
//   prefill_attention(q, keys, values, allowed, scale) -> out
//     q (B, H, T, hd) bfloat16, any strides but the last; keys, values (B, Hkv, K, hd) bfloat16,
//     any strides but the last; allowed (B, 1, T, K) bool, True where query t may attend key j
//     (contiguous along K); out (B, T, H, hd) bfloat16, contiguous: the output projection's rows.
//     softmax(q k^T * scale) v over the allowed keys, heads h*G .. h*G+G-1 on key/value head h;
//     a query that may attend nothing gets zeros (SDPA's would be NaN).
//
// Why our own: SDPA's CPU kernel computes a bfloat16 chunk in float32 blocks at ~50-100
// GFLOP/s on a Zen 4 (a 1530-token first prompt: 0.75 of its 2.1 s in SDPA, where the
// projections' bfloat16 matmuls ran ~390 GFLOP/s). This kernel: 180-270 GFLOP/s, 0.29-0.40x
// SDPA's time for the chunks of that prompt, 0.37x for a 2048-token prompt in one chunk
// (`benchmarks/prefill_attention.py`); the first prompt 0.80x its time with SDPA.
//
// How (flash attention, in bfloat16 dot products): the keys and values of each (row, key/value
// head) are first packed for `dpbf16ps` (which adds the products of 16 pairs of bfloat16 to 16
// float32 lanes): keys by blocks of 64, a pair of dimensions of 16 keys a vector; values a pair of
// keys for 16 dimensions a vector. Then each task, 64 query rows (the G heads of a position side by
// side: they share its mask row), walks tiles of 4 rows through the key blocks their masks allow: a
// tile's 4 x 64 scores in registers (one broadcast query pair against 4 key vectors), masked and
// scaled, the online softmax (running maximum and sum per row), the probabilities rounded to
// bfloat16 and the 4 rows' outputs accumulated in float32 by 64 dimensions at a time. Packed, a
// key/value head of a 2k-token context is 0.5 MB (heads of 64 dimensions): it stays in the L2 cache
// for every tile. The scores and sums are float32 (the products of bfloat16 pairs are exact), the
// probabilities bfloat16 (flash attention's own rounding): against a float64 reference the output's
// errors are bfloat16's, SDPA's on average (tests/engine/test_prefill_kernels.py holds the
// bounds).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace tramontane {
namespace {

constexpr int64_t kKeys = 64;      // keys per block: 4 vectors of 16 scores
constexpr int64_t kRows = 4;       // query rows per tile
constexpr int64_t kTaskRows = 64;  // query rows per task
constexpr int64_t kDims = 64;      // output dimensions accumulated at once (16 registers)
constexpr int64_t kMaxHeadDim = 256;

// The keys (or values) of one head start at `at`, key j at at + j * stride (elements).
struct HeadRows {
  const uint16_t* at;
  int64_t stride;
};

// Keys packed for the scores: element (j, 2 i + e) at ((j / 64) * hd/2 + i) * 128 + (j % 64) * 2
// + e, so that at pair i the 4 vectors of a block's 64 keys are 256 consecutive bytes. Keys
// K..Kpad are zeros (masked: never weighed).
void pack_keys(HeadRows k, int64_t K, int64_t Kpad, int64_t hd, uint16_t* to) {
  const int64_t pairs = hd / 2;
  for (int64_t j = 0; j < Kpad; ++j) {
    uint16_t* out = to + (j / kKeys) * pairs * 2 * kKeys + (j % kKeys) * 2;
    if (j >= K) {
      for (int64_t i = 0; i < pairs; ++i) out[i * 2 * kKeys] = out[i * 2 * kKeys + 1] = 0;
      continue;
    }
    const uint16_t* row = k.at + j * k.stride;
    for (int64_t i = 0; i < pairs; ++i) {
      out[i * 2 * kKeys] = row[2 * i];
      out[i * 2 * kKeys + 1] = row[2 * i + 1];
    }
  }
}

// Values packed for the outputs: element (j, d) at ((j / 2) * hd + d) * 2 + j % 2, so that one
// vector holds keys 2m and 2m+1 of 16 dimensions. Values K..Kpad are zeros.
void pack_values(HeadRows v, int64_t K, int64_t Kpad, int64_t hd, uint16_t* to) {
  for (int64_t j = 0; j < Kpad; ++j) {
    uint16_t* out = to + (j / 2) * hd * 2 + j % 2;
    if (j >= K) {
      for (int64_t d = 0; d < hd; ++d) out[d * 2] = 0;
      continue;
    }
    const uint16_t* row = v.at + j * v.stride;
    for (int64_t d = 0; d < hd; ++d) out[d * 2] = row[d];
  }
}

// The keys [first, last] a query may attend; first > last when none.
struct Span {
  int64_t first, last;
};

Span allowed_span(const bool* row, int64_t K) {
  int64_t first = 0, last = K - 1;
  while (first < K && !row[first]) ++first;
  while (last >= first && !row[last]) --last;
  return {first, last};
}

// One task's share of the work: query rows [r0, r1) of (row b, key/value head h), rows ordered
// position-major (row r = position r / G, query head h * G + r % G).
struct Task {
  int64_t b, h, r0, r1, cost;
};

struct Problem {
  const uint16_t* q;
  int64_t q_b, q_h, q_t;  // strides of q (elements)
  const bool* allowed;
  int64_t allowed_b, allowed_t;  // strides of `allowed` (elements)
  const uint16_t* keys;          // packed, `packed` elements per (b, h)
  const uint16_t* values;
  int64_t packed;
  const std::vector<Span>& spans;  // (B, T)
  int64_t T, H, Hkv, K, hd;
  float scale;
  uint16_t* out;  // (B, T, H, hd)
};

#ifdef TRAMONTANE_X86

TRAMONTANE_AVX512_BF16 inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

TRAMONTANE_AVX512_BF16 inline __m512i broadcast_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32(pair);
}

// The 64 mask bits of one query row for keys j0 .. j0+63 (keys >= K are not allowed).
TRAMONTANE_AVX512_BF16 inline void mask_bits(const bool* row, int64_t j0, int64_t K,
                                             __mmask16 bits[4]) {
  alignas(64) uint8_t tail[kKeys];
  const uint8_t* at = reinterpret_cast<const uint8_t*>(row) + j0;
  if (j0 + kKeys > K) {
    std::memset(tail, 0, sizeof(tail));
    std::memcpy(tail, at, static_cast<size_t>(K - j0));
    at = tail;
  }
  for (int c = 0; c < 4; ++c) {
    bits[c] = _mm_test_epi8_mask(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 16 * c)),
        _mm_set1_epi8(static_cast<char>(0xff)));
  }
}

// A tile of 4 query rows through the key blocks its masks allow, to its 4 output rows.
TRAMONTANE_AVX512_BF16 void attend_tile(const Problem& p, const uint16_t* const* q,
                                        const bool* const* masks, uint16_t* const* out, int rows,
                                        const uint16_t* keys, const uint16_t* values,
                                        int64_t first, int64_t last) {
  const int64_t hd = p.hd, pairs = hd / 2;
  alignas(64) float acc_out[kRows][kMaxHeadDim];
  alignas(64) uint16_t probs[kRows][kKeys];
  float top[kRows], total[kRows], alpha[kRows];
  for (int r = 0; r < kRows; ++r) {
    top[r] = -std::numeric_limits<float>::infinity();
    total[r] = 0.f;
    std::fill(acc_out[r], acc_out[r] + hd, 0.f);
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t j0 = first / kKeys * kKeys; j0 <= last; j0 += kKeys) {
    // Scores: 4 rows x 64 keys, one broadcast query pair against 4 key vectors.
    const uint16_t* kb = keys + j0 * hd;  // the block's packed keys (j0 / 64 * pairs * 128)
    __m512 s[kRows][4];
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < pairs; ++i) {
      const uint16_t* at = kb + i * 2 * kKeys;
      __m512i kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_si512(at + 32 * c);
      for (int r = 0; r < kRows; ++r) {
        const __m512i qp = broadcast_pair(q[r] + 2 * i);
        for (int c = 0; c < 4; ++c) s[r][c] = dot(s[r][c], qp, kv[c]);
      }
    }
    // Online softmax per row: the block's maximum, the factor exp(old - new maximum) of the
    // sums and outputs so far (the 4 rows' in one vector; 1 when the maximum did not rise),
    // the exponentials (0 where not allowed), the probabilities to bfloat16 pairs.
    __mmask16 bits[kRows][4];
    alignas(64) float rise[16] = {};
    bool rescale = false;
    for (int r = 0; r < kRows; ++r) {
      mask_bits(masks[r], j0, p.K, bits[r]);
      for (int c = 0; c < 4; ++c) {
        s[r][c] = _mm512_mask_mul_ps(neg_inf, bits[r][c], s[r][c], scale);
      }
      const float block_top = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_max_ps(s[r][0], s[r][1]), _mm512_max_ps(s[r][2], s[r][3])));
      if (block_top > top[r]) {  // -inf before: the factor is 0 (clamped: ~1e-38 of zeros)
        rise[r] = top[r] - block_top;
        top[r] = block_top;
        rescale = true;
      }
    }
    _mm512_store_ps(rise, exp16(_mm512_load_ps(rise)));
    for (int r = 0; r < kRows; ++r) {
      alpha[r] = rise[r];
      if (top[r] == -std::numeric_limits<float>::infinity()) {  // nothing allowed yet
        std::memset(probs[r], 0, sizeof(probs[r]));
        continue;
      }
      const __m512 shift = _mm512_set1_ps(top[r]);
      __m512 e[4];
      for (int c = 0; c < 4; ++c) {
        e[c] = _mm512_maskz_mov_ps(bits[r][c], exp16(_mm512_sub_ps(s[r][c], shift)));
      }
      total[r] = total[r] * alpha[r] +
                 _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(e[0], e[1]),
                                                    _mm512_add_ps(e[2], e[3])));
      _mm512_store_si512(probs[r], (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
      _mm512_store_si512(probs[r] + 32, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
    }
    // Outputs: 4 rows x 64 dimensions at a time, one broadcast pair of probabilities against
    // 4 vectors of values.
    const uint16_t* vb = values + j0 * hd;  // keys j0, j0+1 at vb, the next pair hd * 2 on
    for (int64_t d0 = 0; d0 < hd; d0 += kDims) {
      __m512 o[kRows][4];
      for (int r = 0; r < kRows; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < 4; ++c) {
          o[r][c] = _mm512_load_ps(acc_out[r] + d0 + 16 * c);
          if (rescale) o[r][c] = _mm512_mul_ps(o[r][c], a);
        }
      }
      for (int64_t m = 0; m < kKeys / 2; ++m) {
        const uint16_t* at = vb + (m * hd + d0) * 2;
        __m512i vv[4];
        for (int c = 0; c < 4; ++c) vv[c] = _mm512_loadu_si512(at + 32 * c);
        for (int r = 0; r < kRows; ++r) {
          const __m512i pp = broadcast_pair(probs[r] + 2 * m);
          for (int c = 0; c < 4; ++c) o[r][c] = dot(o[r][c], pp, vv[c]);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        for (int c = 0; c < 4; ++c) _mm512_store_ps(acc_out[r] + d0 + 16 * c, o[r][c]);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(total[r] > 0.f ? 1.f / total[r] : 0.f);
    for (int64_t d = 0; d < hd; d += 16) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc_out[r] + d), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + d), (__m256i)y);
    }
  }
}

TRAMONTANE_AVX512_BF16 void run_task(const Problem& p, const Task& task) {
  const int64_t G = p.H / p.Hkv;
  const uint16_t* keys = p.keys + (task.b * p.Hkv + task.h) * p.packed;
  const uint16_t* values = p.values + (task.b * p.Hkv + task.h) * p.packed;
  for (int64_t r = task.r0; r < task.r1; r += kRows) {
    const int rows = static_cast<int>(std::min(kRows, task.r1 - r));
    const uint16_t* q[kRows];
    const bool* masks[kRows];
    uint16_t* out[kRows];
    int64_t first = p.K, last = -1;
    for (int i = 0; i < kRows; ++i) {
      const int64_t row = r + std::min(i, rows - 1);  // a short tile repeats its last row
      const int64_t t = row / G, head = task.h * G + row % G;
      q[i] = p.q + task.b * p.q_b + head * p.q_h + t * p.q_t;
      masks[i] = p.allowed + task.b * p.allowed_b + t * p.allowed_t;
      out[i] = p.out + ((task.b * p.T + t) * p.H + head) * p.hd;
      const Span span = p.spans[task.b * p.T + t];
      first = std::min(first, span.first);
      last = std::max(last, span.last);
    }
    attend_tile(p, q, masks, out, rows, keys, values, first, last);
  }
}

#endif

void check(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
           const at::Tensor& allowed) {
  TORCH_CHECK(has_avx512_bf16(), "prefill_attention needs a CPU with AVX512-BF16 (where "
              "prefill_attention_here() is false, SDPA runs)");
  for (const at::Tensor* t : {&q, &keys, &values}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
                "prefill_attention: q, keys and values must be 4-d bfloat16 with contiguous "
                "heads, got ", t->sizes(), " ", t->scalar_type(), " strides ", t->strides());
  }
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  const int64_t Hkv = keys.size(1), K = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == hd && values.sizes() == keys.sizes(),
              "prefill_attention: keys ", keys.sizes(), " and values ", values.sizes(),
              " do not match q ", q.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "prefill_attention: ", H, " query heads do not share ",
              Hkv, " key/value heads evenly");
  TORCH_CHECK(hd % kDims == 0 && hd <= kMaxHeadDim, "prefill_attention: head dimension ", hd,
              " is not a multiple of ", kDims, " up to ", kMaxHeadDim);
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 4 && allowed.size(0) == B &&
                  allowed.size(1) == 1 && allowed.size(2) == T && allowed.size(3) == K &&
                  allowed.stride(3) == 1,
              "prefill_attention: allowed must be bool (", B, ", 1, ", T, ", ", K,
              ") contiguous along the keys, got ", allowed.sizes(), " ", allowed.scalar_type());
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& allowed, double scale) {
  check(q, keys, values, allowed);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  const int64_t Hkv = keys.size(1), K = keys.size(2), G = H / Hkv;
  at::Tensor out = at::empty({B, T, H, hd}, q.options());
  if (B == 0 || T == 0 || H == 0) return out;
  const int64_t Kpad = std::max<int64_t>(kKeys, (K + kKeys - 1) / kKeys * kKeys);
  const int64_t packed = Kpad * hd;
  // The packed keys and values, in a buffer the calling thread keeps from one call to the
  // next (fresh pages are zeroed by the kernel on first touch).
  thread_local std::vector<uint16_t> buffer;
  buffer.resize(std::max(buffer.size(), static_cast<size_t>(2 * B * Hkv * packed)));
  uint16_t* kp_at = buffer.data();
  uint16_t* vp_at = kp_at + B * Hkv * packed;
  const auto* k_at = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  const auto* v_at = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      pack_keys({k_at + b * keys.stride(0) + h * keys.stride(1), keys.stride(2)}, K, Kpad, hd,
                kp_at + i * packed);
      pack_values({v_at + b * values.stride(0) + h * values.stride(1), values.stride(2)}, K,
                  Kpad, hd, vp_at + i * packed);
    }
  });
  const bool* allowed_at = allowed.data_ptr<bool>();
  std::vector<Span> spans(static_cast<size_t>(B * T));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      spans[b * T + t] =
          allowed_span(allowed_at + b * allowed.stride(0) + t * allowed.stride(2), K);
    }
  }
  // Tasks of kTaskRows query rows, the costliest (most keys) first: the threads take them in
  // that order, so the last ones to finish are short.
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t r0 = 0; r0 < T * G; r0 += kTaskRows) {
        const int64_t r1 = std::min(T * G, r0 + kTaskRows);
        int64_t cost = 0;
        for (int64_t t = r0 / G; t <= (r1 - 1) / G; ++t) {
          const Span s = spans[b * T + t];
          cost += std::max<int64_t>(0, s.last - s.first + 1);
        }
        tasks.push_back({b, h, r0, r1, cost});
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
#ifdef TRAMONTANE_X86
  const Problem p{reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()),
                  q.stride(0), q.stride(1), q.stride(2),
                  allowed_at, allowed.stride(0), allowed.stride(2),
                  kp_at, vp_at, packed, spans, T, H, Hkv, K, hd, static_cast<float>(scale),
                  reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())};
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || at::in_parallel_region()) {
    for (const Task& task : tasks) run_task(p, task);
  } else {
    std::atomic<size_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (size_t i = next.fetch_add(1); i < tasks.size(); i = next.fetch_add(1)) {
        run_task(p, tasks[i]);
      }
    });
  }
#endif
  return out;
}

bool prefill_attention_here() { return has_avx512_bf16(); }

}  // namespace
}  // namespace tramontane

TORCH_LIBRARY_FRAGMENT(tramontane, m) {
  m.def("prefill_attention(Tensor q, Tensor keys, Tensor values, Tensor allowed, float scale) "
        "-> Tensor");
  m.def("prefill_attention_here() -> bool");
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("prefill_attention", &tramontane::prefill_attention);
}

TORCH_LIBRARY_IMPL(tramontane, CompositeExplicitAutograd, m) {
  m.impl("prefill_attention_here", &tramontane::prefill_attention_here);
}
