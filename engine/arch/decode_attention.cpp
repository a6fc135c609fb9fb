// One new token per row: its key and value written into the cache, then its attention over the
// cache, for grouped-query attention: the decode step's attention
// (`torch.ops.tramontane.decode_attention`, registered by kernels.py); and a few new tokens per
// row at once (`decode_attention_tokens`, decode_layer.cpp's: a keystroke's new prompt tokens,
// a draft being checked), each block of the cache read once for all of them.
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
// all G heads (blocks of 4 query heads), in one pass (attention_loops.h holds the loops, and
// says how they meet the memory and the instruction limits). float32 throughout, like SDPA's
// CPU kernel; the result differs from a float64 reference by float32 roundings only.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "attention_loops.h"
#include "products.h"
#include "simd.h"

namespace {

using namespace tramontane::attention;

// Whether n float32 values are all bfloat16 values (their low 16 bits zero).
bool bf16_values(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], sizeof(bits));
    if ((bits & 0xffffu) != 0) return false;
  }
  return true;
}

}  // namespace

namespace tramontane {
namespace {

void check_cache(const at::Tensor& keys, const at::Tensor& values, int64_t B, int64_t Hkv,
                 int64_t hd) {
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4,
              "decode_attention: expected keys, values (B, Hkv, S, hd)");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) == B && keys.size(1) == Hkv &&
                  keys.size(3) == hd,
              "decode_attention: keys ", keys.sizes(), " and values ", values.sizes(),
              " do not match the queries' B ", B, ", Hkv ", Hkv, ", hd ", hd);
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
              "decode_attention: keys and values must both be float32 or bfloat16");
  TORCH_CHECK(keys.device().is_cpu() && values.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 &&
                  keys.strides() == values.strides(),
              "decode_attention: the last dimension of keys and values must be contiguous, "
              "with the same strides for both");
}

// The new keys and values (rows x Hkv x hd; row r belongs to the cache's row r / per_row)
// into their slots (none where the slot is < 0: padding), in place where the layouts allow: a
// tensor op here costs a dispatch each, several per layer and step.
void write_new(const at::Tensor& k, const at::Tensor& v, at::Tensor& keys, at::Tensor& values,
               const int64_t* slot_at, int64_t rows, int64_t per_row) {
  const int64_t Hkv = keys.size(1), hd = keys.size(3), S = keys.size(2);
  const bool raw_write = k.is_contiguous() && v.is_contiguous() &&
                         k.scalar_type() == keys.scalar_type() &&
                         v.scalar_type() == keys.scalar_type();
  const int64_t elem = keys.scalar_type() == at::kBFloat16 ? 2 : 4;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at_slot = slot_at[r], b = r / per_row;
    if (at_slot < 0) continue;
    TORCH_CHECK(at_slot < S, "decode_attention: slot ", at_slot, " is past the ", S,
                " slots in use");
    if (!raw_write) {
      const at::Tensor knew = k.reshape({rows, Hkv, hd}), vnew = v.reshape({rows, Hkv, hd});
      keys.select(0, b).select(1, at_slot).copy_(knew.select(0, r));
      values.select(0, b).select(1, at_slot).copy_(vnew.select(0, r));
      continue;
    }
    for (int64_t kv = 0; kv < Hkv; ++kv) {
      const int64_t from = ((r * Hkv + kv) * hd) * elem;
      const int64_t to = b * keys.stride(0) + kv * keys.stride(1) + at_slot * keys.stride(2);
      std::memcpy(static_cast<char*>(keys.data_ptr()) + to * elem,
                  static_cast<const char*>(k.data_ptr()) + from, hd * elem);
      std::memcpy(static_cast<char*>(values.data_ptr()) + to * elem,
                  static_cast<const char*>(v.data_ptr()) + from, hd * elem);
    }
  }
}

// The attention of n tokens of each of B rows (q: B x n x Hkv x G x hd float32, mask: B x n x
// S) over the cache as it is: each (row, key/value head) is one task, which reads its keys and
// values once for all n tokens and G heads (attention_loops.h).
at::Tensor attend_rows(const at::Tensor& q, int64_t B, int64_t n, int64_t Hkv, int64_t G,
                       int64_t hd, const at::Tensor& keys, const at::Tensor& values,
                       const bool* mp) {
  const int64_t S = keys.size(2);
  const Float32Values q32(q);
  const float* qp = q32.data();
  at::Tensor out = at::empty({B * n, Hkv, G, hd}, q.options().dtype(at::kFloat));
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const bool bf16 = keys.scalar_type() == at::kBFloat16;
  const int64_t elem = bf16 ? 2 : 4;
  const auto* kp = static_cast<const char*>(keys.data_ptr());
  const auto* vp = static_cast<const char*>(values.data_ptr());
  float* op = out.data_ptr<float>();
#ifdef TRAMONTANE_X86
  const bool avx2 = has_avx2() && hd % 16 == 0;
  // AVX512-BF16's loops take bfloat16 queries: those of a bfloat16 model are (a float32 query
  // of other values goes to the AVX2 loops, which read it as it is).
  const bool dot = bf16 && avx2 && has_avx512_bf16() && hd % 32 == 0 &&
                   (q.scalar_type() == at::kBFloat16 || bf16_values(qp, q.numel()));
#endif
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
#ifdef TRAMONTANE_X86
    std::vector<float> scratch(avx2 ? scratch_floats(hd, n) : G * S);
#else
    std::vector<float> scratch(G * S);
#endif
    Head heads[kMaxTokens];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, kv = task % Hkv;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t at = ((b * n + t) * Hkv + kv) * G * hd;
        heads[t] = Head{qp + at,
                        kp + (b * keys.stride(0) + kv * keys.stride(1)) * elem,
                        vp + (b * values.stride(0) + kv * values.stride(1)) * elem,
                        keys.stride(2), mp + (b * n + t) * S, op + at};
      }
#ifdef TRAMONTANE_X86
      if (dot) {
        attend_vector<uint16_t, true>(heads, n, G, S, hd, scale, scratch.data());
        continue;
      }
      if (avx2) {
        if (bf16) attend_vector<uint16_t, false>(heads, n, G, S, hd, scale, scratch.data());
        else attend_vector<float, false>(heads, n, G, S, hd, scale, scratch.data());
        continue;
      }
#endif
      for (int64_t t = 0; t < n; ++t) {
        if (bf16) attend<uint16_t>(heads[t], G, S, hd, scale, scratch.data());
        else attend<float>(heads[t], G, S, hd, scale, scratch.data());
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& keys, at::Tensor& values, const at::Tensor& slot,
                            const at::Tensor& allowed) {
  TORCH_CHECK(q.dim() == 4, "decode_attention: expected q (B, Hkv, G, hd)");
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), hd = q.size(3);
  check_cache(keys, values, B, Hkv, hd);
  TORCH_CHECK(q.device().is_cpu(), "decode_attention: CPU tensors only");
  const int64_t S = keys.size(2);
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.numel() == B * S,
              "decode_attention: expected a (B, S) boolean mask of ", B * S, " values");
  TORCH_CHECK(k.numel() == B * Hkv * hd && v.numel() == B * Hkv * hd && slot.numel() == B,
              "decode_attention: expected a new key and value of ", B * Hkv * hd,
              " values and ", B, " slots");
  const at::Tensor slots = slot.scalar_type() == at::kLong && slot.is_contiguous()
                               ? slot
                               : slot.to(at::kLong).contiguous();
  write_new(k, v, keys, values, slots.data_ptr<int64_t>(), B, 1);
  const at::Tensor mask = allowed.is_contiguous() ? allowed : allowed.contiguous();
  return attend_rows(q, B, 1, Hkv, G, hd, keys, values, mask.data_ptr<bool>())
      .view({B, Hkv, G, hd});
}

at::Tensor decode_attention_tokens(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, at::Tensor& keys, at::Tensor& values,
                                   const at::Tensor& slot, const at::Tensor& allowed) {
  TORCH_CHECK(q.dim() == 5, "decode_attention: expected q (B, T, Hkv, G, hd)");
  const int64_t B = q.size(0), T = q.size(1), Hkv = q.size(2), G = q.size(3), hd = q.size(4);
  TORCH_CHECK(T >= 1 && T <= kMaxTokens, "decode_attention: 1 to ", kMaxTokens,
              " tokens a row, got ", T);
  check_cache(keys, values, B, Hkv, hd);
  const int64_t S = keys.size(2), N = B * T;
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.is_contiguous() && slot.numel() == N &&
                  allowed.scalar_type() == at::kBool && allowed.is_contiguous() &&
                  allowed.numel() == N * S && k.numel() == N * Hkv * hd &&
                  v.numel() == N * Hkv * hd,
              "decode_attention: expected ", N, " slots, an ", N, " x ", S, " mask and ", N,
              " new keys and values");
  const int64_t* slot_at = slot.data_ptr<int64_t>();
  const bool* mp = allowed.data_ptr<bool>();
  // In order, token t attends before token t' > t writes: the same only where t does not
  // attend to the slot t' writes (a rotating buffer that wraps within the tokens).
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t later = t + 1; later < T; ++later) {
        const int64_t s = slot_at[b * T + later];
        if (s >= 0 && s < S && mp[(b * T + t) * S + s]) return {};
      }
    }
  }
  write_new(k, v, keys, values, slot_at, N, T);
  return attend_rows(q, B, T, Hkv, G, hd, keys, values, mp);
}

}  // namespace tramontane

TORCH_LIBRARY_FRAGMENT(tramontane, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, "
        "Tensor slot, Tensor allowed) -> Tensor");
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("decode_attention", &tramontane::decode_attention);
}
