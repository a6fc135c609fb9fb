// The one-token decode step of a dense decoder, in parts: `decode_slots` (where each row's
// token goes in a group of layers' cache, and which slots it attends to), `decode_layer` (a
// whole transformer block), `decode_logits` (the final norm and the output projection).
// decode_step.cpp runs them all in one call (`DecodeStep`, what `runtime/native.py` uses); the
// parts are ops of their own too, for the tests and for stepping through a step.
//
// Why: a compiled graph of the same step made ~50 kernel and extern calls plus the guards on
// its ~300 inputs. Measured on the 2-core AVX2 machine here (int4 200M model), that graph spent
// ~3 ms of a ~10 ms step outside the weight products; llama.cpp spends well under one. No
// compile either: the step runs from the first keystroke.
//
// Same arithmetic as the eager model (`arch/layers.py`), rounding where it rounds: every
// tensor it would hold in the model's dtype is rounded to that dtype here (bfloat16: nearest,
// ties to even; float32: as is), the norms and the softmax run in float32, the products sum
// in float32 (products.cpp), the attention is decode_attention.cpp's.
//
//   h (B, dim): the residual stream in the model's dtype (bfloat16 or float32)
//   weights, kinds: the seven projections wq wk wv wo w1 w3 w2 (`weights_of` in products.cpp)
//   positions (B,) int64, -1 = padding; inv_freq (hd / 2,) float32: the rotary frequencies
//   keys, values (B, Hkv, capacity + 1, hd): the layer's cache, written in place; attention
//   reads the first `span` slots; slot, allowed: `decode_slots`' for the layer's group

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "products.h"
#include "simd.h"

namespace {

using namespace tramontane;

inline float round_bf16(float v) {  // as at::BFloat16(v) rounds
  if (std::isnan(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

#ifdef TRAMONTANE_X86
// Eight round_bf16s (a NaN stays itself).
TRAMONTANE_AVX2 inline __m256 round_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))),
      _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

TRAMONTANE_AVX2 void round_bf16_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, round_bf16x8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = round_bf16(x[i]);
}

// gate[i] = silu(gate[i]) * up[i] with bfloat16 roundings of gate, up, the SiLU and the
// product (`bf16`), or none.
TRAMONTANE_AVX2 void silu_mul_avx2(float* gate, const float* up, int64_t n, bool bf16) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  auto rnd = [bf16](__m256 v) { return bf16 ? round_bf16x8(v) : v; };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = rnd(_mm256_loadu_ps(gate + i));
    const __m256 silu = rnd(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g)))));
    _mm256_storeu_ps(gate + i, rnd(_mm256_mul_ps(silu, rnd(_mm256_loadu_ps(up + i)))));
  }
  for (; i < n; ++i) {
    const float g = bf16 ? round_bf16(gate[i]) : gate[i];
    const float silu = g / (1.f + std::exp(-g));
    const float u = bf16 ? round_bf16(up[i]) : up[i];
    gate[i] = bf16 ? round_bf16(round_bf16(silu) * u) : silu * u;
  }
}
#endif

// The value a tensor of the model's dtype holds.
struct Rounding {
  bool bf16;
  float operator()(float v) const { return bf16 ? round_bf16(v) : v; }
  void all(std::vector<float>& xs) const {
    if (!bf16) return;
#ifdef TRAMONTANE_X86
    if (has_avx2()) return round_bf16_avx2(xs.data(), static_cast<int64_t>(xs.size()));
#endif
    for (float& x : xs) x = round_bf16(x);
  }
};

// The feed-forward's gate: gate[i] = silu(gate[i]) * up[i], rounded as the eager model rounds
// (gate and up, the SiLU, the product).
void silu_mul(std::vector<float>& gate, const std::vector<float>& up, const Rounding& rnd) {
  const int64_t n = static_cast<int64_t>(gate.size());
#ifdef TRAMONTANE_X86
  if (has_avx2()) return silu_mul_avx2(gate.data(), up.data(), n, rnd.bf16);
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float g = rnd(gate[i]);
    gate[i] = rnd(rnd(g / (1.f + std::exp(-g))) * rnd(up[i]));
  }
}

Rounding rounding_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, what,
              ": the model's dtype must be bfloat16 or float32, got ", t.scalar_type());
  return Rounding{t.scalar_type() == at::kBFloat16};
}

// RMSNorm of each of `rows` rows as `layers.RMSNorm` computes it: normalised in float32,
// rounded to the model's dtype, times the weight, rounded again.
void rms_norm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
              const Rounding& rnd, float* out) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* xb = x + b * dim;
    float squares = 0.f;
    for (int64_t i = 0; i < dim; ++i) squares += xb[i] * xb[i];
    const float r = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[b * dim + i] = rnd(weight[i] * rnd(xb[i] * r));
  }
}

// `layers.apply_rotary` on `heads` heads of hd values: pairs (x0, x1) -> (x0 c - x1 s,
// x1 c + x0 s), with c and s in the model's dtype and the product by s rounded first.
void rotate(float* x, int64_t heads, int64_t hd, const std::vector<float>& c,
            const std::vector<float>& s, const Rounding& rnd) {
  for (int64_t h = 0; h < heads; ++h) {
    float* p = x + h * hd;
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float x0 = p[2 * i], x1 = p[2 * i + 1];
      p[2 * i] = rnd(rnd(x1 * -s[i]) + x0 * c[i]);
      p[2 * i + 1] = rnd(rnd(x0 * s[i]) + x1 * c[i]);
    }
  }
}

// A float32 buffer of values the model's dtype holds exactly, as a tensor of that dtype.
at::Tensor as_tensor(const std::vector<float>& xs, at::IntArrayRef shape,
                     const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(t.data_ptr<float>(), xs.data(), xs.size() * sizeof(float));
    return t;
  }
  uint16_t* to = reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
  for (size_t i = 0; i < xs.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &xs[i], sizeof(bits));
    to[i] = static_cast<uint16_t>(bits >> 16);  // exact: the value is a bfloat16 already
  }
  return t;
}

void product(const std::vector<float>& x, int64_t rows, int64_t k, const Weight& w,
             const Rounding& rnd, std::vector<float>& y) {
  y.resize(rows * w.rows());
  products(x.data(), rows, k, {w}, {y.data()});
  rnd.all(y);
}

// A layer's float32 buffers, kept from call to call on each thread (sized once for a decode
// step's rows, then neither allocated nor zeroed again): allocating and zeroing a dozen of
// them in every layer put malloc, free and memset at ~4% of the calling thread's time in an
// int4 step (perf), while the other thread waited.
struct Buffers {
  std::vector<float> x, q, k, v, out, qt, kt, vt, o, h1, gate, up, down;
};

Buffers& buffers() {
  static thread_local Buffers b;
  return b;
}

std::vector<float>& sized(std::vector<float>& v, int64_t n) {
  v.resize(n);
  return v;
}

void check_rows(const at::Tensor& h, const char* what) {
  TORCH_CHECK(h.dim() == 2 && h.device().is_cpu(), what,
              ": expected the residual stream as (B, dim) on the CPU, got ", h.sizes());
}

}  // namespace

namespace tramontane {

at::Tensor decode_layer_impl(const at::Tensor& h, const at::Tensor& attention_norm,
                             const at::Tensor& ffn_norm, const std::vector<Weight>& ws,
                             double eps, const at::Tensor& positions,
                             const at::Tensor& inv_freq, at::Tensor& keys, at::Tensor& values,
                             int64_t span, const at::Tensor& slot, const at::Tensor& allowed) {
  const char* what = "decode_layer";
  check_rows(h, what);
  const Rounding rnd = rounding_of(h, what);
  TORCH_CHECK(ws.size() == 7, what, ": expected the 7 weights wq wk wv wo w1 w3 w2, got ",
              ws.size());
  const Weight &wq = ws[0], &wk = ws[1], &wv = ws[2], &wo = ws[3];
  const Weight &w1 = ws[4], &w3 = ws[5], &w2 = ws[6];
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == h.scalar_type(), what,
              ": expected keys (B, Hkv, slots, hd) in the model's dtype, got ", keys.sizes(),
              " ", keys.scalar_type());
  // N rows: T new tokens of each of the cache's B rows, row b's in rows b*T .. b*T + T - 1.
  const int64_t N = h.size(0), dim = h.size(1), B = keys.size(0), Hkv = keys.size(1);
  const int64_t hd = keys.size(3), nq = wq.rows(), nkv = Hkv * hd, hidden = w1.rows();
  TORCH_CHECK(B >= 1 && N % B == 0, what, ": ", N, " rows are not the same number of new "
              "tokens for each of the cache's ", B, " rows");
  const int64_t T = N / B;
  TORCH_CHECK(hd % 2 == 0 && nq % hd == 0 && (nq / hd) % Hkv == 0 && wk.rows() == nkv &&
                  wv.rows() == nkv && wq.inputs() == dim && wk.inputs() == dim &&
                  wv.inputs() == dim && wo.inputs() == nq && wo.rows() == dim &&
                  w1.inputs() == dim && w3.inputs() == dim && w3.rows() == hidden &&
                  w2.inputs() == hidden && w2.rows() == dim,
              what, ": the weights' shapes do not make a decoder layer of width ", dim,
              " with ", Hkv, " key/value heads of ", hd);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == N &&
                  positions.is_contiguous(),
              what, ": expected ", N, " int64 positions");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == N && slot.is_contiguous() &&
                  allowed.scalar_type() == at::kBool && allowed.numel() == N * span &&
                  allowed.is_contiguous(),
              what, ": expected decode_slots' ", N, " slots and ", N, " x ", span, " mask");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == hd / 2 &&
                  inv_freq.is_contiguous(),
              what, ": expected ", hd / 2, " float32 rotary frequencies");
  TORCH_CHECK(span >= 1 && span <= keys.size(2), what, ": span ", span, " is not within the ",
              keys.size(2), " slots of the cache");
  TORCH_CHECK(attention_norm.numel() == dim && ffn_norm.numel() == dim, what,
              ": expected norm weights of ", dim);

  const Float32Values h32(h), norm1(attention_norm), norm2(ffn_norm);
  const float epsf = static_cast<float>(eps);
  Buffers& buf = buffers();
  std::vector<float>& x = sized(buf.x, N * dim);
  rms_norm(h32.data(), norm1.data(), N, dim, epsf, rnd, x.data());
  std::vector<float>& q = sized(buf.q, N * nq);
  std::vector<float>& k = sized(buf.k, N * nkv);
  std::vector<float>& v = sized(buf.v, N * nkv);
  products(x.data(), N, dim, {wq, wk, wv}, {q.data(), k.data(), v.data()});
  rnd.all(q);
  rnd.all(k);
  rnd.all(v);

  // Rotary factors in the model's dtype, from float32 angles (`layers.rotary_cos_sin`);
  // a padding row (-1) turns by 0.
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* freq = inv_freq.data_ptr<float>();
  std::vector<float> c(hd / 2), s(hd / 2);
  for (int64_t r = 0; r < N; ++r) {
    const float p = static_cast<float>(std::max<int64_t>(pos[r], 0));
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float angle = p * freq[i];
      c[i] = rnd(std::cos(angle));
      s[i] = rnd(std::sin(angle));
    }
    rotate(q.data() + r * nq, nq / hd, hd, c, s, rnd);
    rotate(k.data() + r * nkv, Hkv, hd, c, s, rnd);
  }

  // Token t of every row writes its key and value, then attends (its mask holds no later
  // position): the chunk is causal, written and read in order, or all written first where no
  // token sees a slot a later one writes.
  std::vector<float>& out = sized(buf.out, N * nq);
  at::Tensor kv_keys = keys.narrow(2, 0, span), kv_values = values.narrow(2, 0, span);
  // Several tokens a row: their attention in one pass over the cache where the order allows
  // (`decode_attention_tokens`: each block of keys and values read once for all of them);
  // else, and for one token, the tokens one after the other.
  at::Tensor together;
  if (T > 1) {
    together = tramontane::decode_attention_tokens(
        at::from_blob(q.data(), {B, T, Hkv, nq / hd / Hkv, hd}, at::TensorOptions(at::kFloat)),
        as_tensor(k, {B, T, Hkv, hd}, keys.options()),
        as_tensor(v, {B, T, Hkv, hd}, keys.options()), kv_keys, kv_values, slot, allowed);
  }
  if (together.defined()) {
    const float* a = together.data_ptr<float>();
    std::copy(a, a + N * nq, out.begin());
  } else {
    const int64_t* slot_at = slot.data_ptr<int64_t>();
    const bool* mask = allowed.data_ptr<bool>();
    std::vector<float>& qt = sized(buf.qt, B * nq);
    std::vector<float>& kt = sized(buf.kt, B * nkv);
    std::vector<float>& vt = sized(buf.vt, B * nkv);
    at::Tensor slot_t = at::empty({B}, slot.options());
    at::Tensor allowed_t = at::empty({B, span}, allowed.options());
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = b * T + t;
        std::copy(q.begin() + r * nq, q.begin() + (r + 1) * nq, qt.begin() + b * nq);
        std::copy(k.begin() + r * nkv, k.begin() + (r + 1) * nkv, kt.begin() + b * nkv);
        std::copy(v.begin() + r * nkv, v.begin() + (r + 1) * nkv, vt.begin() + b * nkv);
        slot_t.data_ptr<int64_t>()[b] = slot_at[r];
        std::memcpy(allowed_t.data_ptr<bool>() + b * span, mask + r * span, span);
      }
      const at::Tensor attended = tramontane::decode_attention(
          at::from_blob(qt.data(), {B, Hkv, nq / hd / Hkv, hd}, at::TensorOptions(at::kFloat)),
          as_tensor(kt, {B, Hkv, hd}, keys.options()),
          as_tensor(vt, {B, Hkv, hd}, keys.options()), kv_keys, kv_values, slot_t, allowed_t);
      const float* a = attended.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        std::copy(a + b * nq, a + (b + 1) * nq, out.begin() + (b * T + t) * nq);
      }
    }
  }
  rnd.all(out);

  std::vector<float>& o = buf.o;
  product(out, N, nq, wo, rnd, o);
  std::vector<float>& h1 = sized(buf.h1, N * dim);
  for (int64_t i = 0; i < N * dim; ++i) h1[i] = rnd(h32.data()[i] + o[i]);
  rms_norm(h1.data(), norm2.data(), N, dim, epsf, rnd, x.data());
  std::vector<float>& gate = sized(buf.gate, N * hidden);
  std::vector<float>& up = sized(buf.up, N * hidden);
  products(x.data(), N, dim, {w1, w3}, {gate.data(), up.data()});
  silu_mul(gate, up, rnd);
  std::vector<float>& down = buf.down;
  product(gate, N, hidden, w2, rnd, down);
  for (int64_t i = 0; i < N * dim; ++i) h1[i] = rnd(h1[i] + down[i]);
  return as_tensor(h1, {N, dim}, h.options());
}

// A group of layers' slot map for T new tokens per row (`KVCache.plan`, write first):
// positions (B, T); row b's position p goes to slot p % capacity (slot_pos records it), and
// attends to the first `span` slots that hold a position <= p (and > p - window when the
// group has one; window 0: none). A padding token (p < 0) writes nothing (slot -1) and
// attends to every slot: finite garbage nobody reads. Every write of a row happens before
// its masks are taken, so a token of a chunk may overwrite a rotating buffer's slot that an
// earlier token of the chunk still needs: the caller keeps chunks within the buffer's spare
// slots (`NativeStep.chunk_tokens`). -> slot (B, T), allowed (B, T, span).
std::tuple<at::Tensor, at::Tensor> decode_slots(const at::Tensor& positions,
                                                at::Tensor& slot_pos, int64_t capacity,
                                                int64_t window, int64_t span) {
  const int64_t B = slot_pos.dim() == 2 ? slot_pos.size(0) : 0;
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && B >= 1 &&
                  positions.numel() % B == 0,
              "decode_slots: expected int64 positions, the same number for each of the ", B,
              " rows of the slot map");
  const int64_t T = positions.numel() / B;
  TORCH_CHECK(slot_pos.scalar_type() == at::kLong && slot_pos.is_contiguous() &&
                  capacity >= 1 &&
                  slot_pos.size(1) > capacity && span >= 1 && span <= capacity && window >= 0,
              "decode_slots: expected a (", B, ", capacity + 1) int64 slot map, a span within "
              "the capacity and a window >= 0");
  at::Tensor slot = at::empty({B, T}, positions.options());
  at::Tensor allowed = at::empty({B, T, span}, positions.options().dtype(at::kBool));
  const int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* sp = slot_pos.data_ptr<int64_t>();
  int64_t* out_slot = slot.data_ptr<int64_t>();
  bool* mask = allowed.data_ptr<bool>();
  const int64_t stride = slot_pos.size(1);
  for (int64_t b = 0; b < B; ++b) {
    int64_t* row = sp + b * stride;
    for (int64_t r = b * T; r < (b + 1) * T; ++r) {
      out_slot[r] = pos[r] >= 0 ? pos[r] % capacity : -1;
      if (pos[r] >= 0) row[out_slot[r]] = pos[r];
    }
    for (int64_t r = b * T; r < (b + 1) * T; ++r) {  // after the row's writes: see above
      const int64_t p = pos[r];
      for (int64_t j = 0; j < span; ++j) {
        const int64_t at = row[j];
        mask[r * span + j] =
            p < 0 || (at >= 0 && at <= p && (window == 0 || p - at < window));
      }
    }
  }
  return {slot, allowed};
}

// The final norm and the output projection: float32 logits (B, V) of the values the model's
// dtype holds (`Transformer.forward`: `output(norm(h)).float()`).
at::Tensor decode_logits_impl(const at::Tensor& h, const at::Tensor& norm,
                              const std::vector<Weight>& ws, double eps) {
  const char* what = "decode_logits";
  check_rows(h, what);
  const Rounding rnd = rounding_of(h, what);
  TORCH_CHECK(ws.size() == 1, what, ": expected the output weight");
  const int64_t B = h.size(0), dim = h.size(1);
  TORCH_CHECK(ws[0].inputs() == dim && norm.numel() == dim, what,
              ": the norm and the output weight do not take ", dim, " inputs");
  const Float32Values h32(h), weight(norm);
  std::vector<float>& x = sized(buffers().x, B * dim);
  rms_norm(h32.data(), weight.data(), B, dim, static_cast<float>(eps), rnd, x.data());
  at::Tensor logits = at::empty({B, ws[0].rows()}, h.options().dtype(at::kFloat));
  products(x.data(), B, dim, ws, {logits.data_ptr<float>()});
  if (rnd.bf16) {
    float* y = logits.data_ptr<float>();
    for (int64_t i = 0; i < logits.numel(); ++i) y[i] = round_bf16(y[i]);
  }
  return logits;
}

}  // namespace tramontane

namespace {

at::Tensor decode_layer(const at::Tensor& h, const at::Tensor& attention_norm,
                        const at::Tensor& ffn_norm, at::TensorList weights,
                        at::IntArrayRef kinds, int64_t group, double eps,
                        const at::Tensor& positions, const at::Tensor& inv_freq,
                        at::Tensor& keys, at::Tensor& values, int64_t span,
                        const at::Tensor& slot, const at::Tensor& allowed) {
  return decode_layer_impl(h, attention_norm, ffn_norm,
                           weights_of(weights, kinds, group, "decode_layer"), eps, positions,
                           inv_freq, keys, values, span, slot, allowed);
}

at::Tensor decode_logits(const at::Tensor& h, const at::Tensor& norm, at::TensorList weights,
                         at::IntArrayRef kinds, int64_t group, double eps) {
  return decode_logits_impl(h, norm, weights_of(weights, kinds, group, "decode_logits"), eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tramontane, m) {
  m.def("decode_layer(Tensor h, Tensor attention_norm, Tensor ffn_norm, Tensor[] weights, "
        "int[] kinds, int group, float eps, Tensor positions, Tensor inv_freq, "
        "Tensor(a!) keys, Tensor(b!) values, int span, Tensor slot, Tensor allowed) -> Tensor");
  m.def("decode_slots(Tensor positions, Tensor(a!) slot_pos, int capacity, int window, "
        "int span) -> (Tensor, Tensor)");
  m.def("decode_logits(Tensor h, Tensor norm, Tensor[] weights, int[] kinds, int group, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_slots", &tramontane::decode_slots);
  m.impl("decode_logits", &decode_logits);
}
