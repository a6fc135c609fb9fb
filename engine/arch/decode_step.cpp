// The whole one-token decode step of a dense decoder in one call from Python:
// `torch.classes.tramontane.DecodeStep`, which `runtime/native.py`'s `NativeStep` builds once
// per model and cache geometry and runs every step.
//
// Why: run as ~15 operator calls from a Python loop (one `decode_layer` per layer), the step
// spent ~10% of its time (~0.9 ms of an int4 step of 9 ms, 200M model, 2-core AVX2 machine)
// in the interpreter, the dispatcher and the conversion of each call's ~20 arguments, while
// the second thread spun. The object holds the weights, checked once when it is built; a step
// passes only the tokens, the positions and the cache.
//
//   DecodeStep(embedding, norms (2 per layer), weights (every layer's, `weights_of`'s order),
//              kinds (7 per layer), groups (int4 group per layer, 0: none), norm, output,
//              output_kind, output_group, eps, inv_freq, layer_group, capacity, window)
//   run(tokens, positions: (B,) or (B, T) int64, -1 positions padding; keys, values: the
//       cache's per-layer tensors; slot_pos: its per-group slot maps; spans: the slots each
//       group attends over; last: (B,) the token of each row whose logits to return when T > 1)
//   -> (B, V) float32 logits
//   greedy(tokens, positions, keys, values, slot_pos, spans): one token per row, (B,)
//   -> ([B] token ids, [B] log-probabilities): each row's greedy token (`torch.argmax` of its
//       logits: the first maximum, the first NaN if any) and its `log_softmax` value; the
//       same on given logits: `torch.ops.tramontane.greedy(logits)`
//   verify(tokens, positions, keys, values, slot_pos, spans): (B, T) tokens, -> the greedy
//       token and log-probability after every one of them, row-major ([B * T] each): what
//       speculative decoding checks a draft with (the weights streamed once for all T)

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "products.h"
#include "simd.h"

namespace {

using namespace tramontane;

int64_t tensors_per(int64_t kind) {
  switch (static_cast<Kind>(kind)) {
    case Kind::kInt8: return 2;
    case Kind::kInt4: return 3;
    default: return 1;
  }
}

#ifdef TRAMONTANE_X86
// The first index of the largest of n values, or of the first NaN (torch.argmax's).
TRAMONTANE_AVX2 int64_t argmax_avx2(const float* y, int64_t n) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    top = _mm256_max_ps(top, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float best = hmax(top);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    any_nan |= std::isnan(y[i]);
    best = std::max(best, y[i]);
  }
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    const int hit = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)
                                               : _mm256_cmp_ps(v, _mm256_set1_ps(best),
                                                               _CMP_EQ_OQ));
    if (hit != 0) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
  for (; i < n; ++i) {
    if (any_nan ? std::isnan(y[i]) : y[i] == best) return i;
  }
  return 0;  // every value -inf: torch.argmax's 0
}

// sum(exp(y[i] - top)) over n values, eight exponentials at a time, summed in float64 (a
// float32 sum of 32k terms in 8 lanes was 5e-6 off log_softmax's).
TRAMONTANE_AVX2 double exp_sum_avx2(const float* y, int64_t n, float top) {
  const __m256 vtop = _mm256_set1_ps(top);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(y + i), vtop));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(lo, hi));
  double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) total += std::exp(y[i] - top);
  return total;
}
#endif

// A row's greedy token and its log-probability, as the generation loop takes them from the
// logits (`sampling.sample`'s argmax, `token_logprobs`), without the logits leaving C++: after
// a step, whose weights have streamed through the caches, each tensor op run from Python
// costs several times what it does warm.
std::pair<int64_t, double> greedy_pick(const float* y, int64_t n) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
#ifdef TRAMONTANE_X86
  if (has_avx2()) {
    const int64_t at = argmax_avx2(y, n);
    if (!std::isfinite(y[at])) return {at, kNaN};  // log_softmax's NaN for these
    return {at, static_cast<float>(-std::log(exp_sum_avx2(y, n, y[at])))};
  }
#endif
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(y[i])) return {i, kNaN};
    if (y[i] > y[at]) at = i;
  }
  if (!std::isfinite(y[at])) return {at, kNaN};
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(y[i] - y[at]);
  return {at, static_cast<float>(-std::log(total))};
}

// `greedy_pick` of each row of (B, V) float32 logits: `torch.ops.tramontane.greedy`.
std::tuple<std::vector<int64_t>, std::vector<double>> greedy_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_cpu() &&
                  logits.is_contiguous() && logits.size(1) >= 1,
              "greedy: expected contiguous (B, V) float32 CPU logits, got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t B = logits.size(0), V = logits.size(1);
  std::vector<int64_t> ids(B);
  std::vector<double> logprobs(B);
  for (int64_t b = 0; b < B; ++b) {
    std::tie(ids[b], logprobs[b]) = greedy_pick(logits.data_ptr<float>() + b * V, V);
  }
  return {ids, logprobs};
}

struct Layer {
  at::Tensor attention_norm, ffn_norm;
  std::vector<Weight> weights;
};

class DecodeStep : public torch::CustomClassHolder {
 public:
  DecodeStep(at::Tensor embedding, std::vector<at::Tensor> norms,
             std::vector<at::Tensor> weights, std::vector<int64_t> kinds,
             std::vector<int64_t> groups, at::Tensor norm, std::vector<at::Tensor> output,
             int64_t output_kind, int64_t output_group, double eps, at::Tensor inv_freq,
             std::vector<int64_t> layer_group, std::vector<int64_t> capacity,
             std::vector<int64_t> window)
      : embedding_(std::move(embedding)), norm_(std::move(norm)), eps_(eps),
        inv_freq_(std::move(inv_freq)), layer_group_(std::move(layer_group)),
        capacity_(std::move(capacity)), window_(std::move(window)) {
    const char* what = "DecodeStep";
    const size_t n = layer_group_.size();
    TORCH_CHECK(embedding_.dim() == 2 && embedding_.is_contiguous() && embedding_.is_cpu(),
                what, ": expected a contiguous (V, dim) CPU embedding table");
    TORCH_CHECK(norms.size() == 2 * n && kinds.size() == 7 * n && groups.size() == n, what,
                ": expected 2 norms, 7 kinds and a group for each of the ", n, " layers");
    TORCH_CHECK(n >= 1 && capacity_.size() == window_.size(), what,
                ": expected at least one layer and a window for each capacity");
    size_t at = 0;
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(layer_group_[i] >= 0 &&
                      layer_group_[i] < static_cast<int64_t>(capacity_.size()),
                  what, ": layer ", i, "'s cache group ", layer_group_[i], " does not exist");
      const std::vector<int64_t> layer_kinds(kinds.begin() + 7 * i, kinds.begin() + 7 * i + 7);
      size_t count = 0;
      for (int64_t kind : layer_kinds) count += tensors_per(kind);
      TORCH_CHECK(at + count <= weights.size(), what, ": fewer weights than the kinds take");
      layers_.push_back({norms[2 * i], norms[2 * i + 1],
                         weights_of(at::TensorList(weights.data() + at, count), layer_kinds,
                                    groups[i], what)});
      at += count;
    }
    TORCH_CHECK(at == weights.size(), what, ": more weights than the kinds take");
    output_ = weights_of(output, {output_kind}, output_group, what);
  }

  at::Tensor run(const at::Tensor& tokens, const at::Tensor& positions,
                 std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
                 std::vector<at::Tensor> slot_pos, std::vector<int64_t> spans,
                 std::optional<at::Tensor> last) const {
    if (tokens.dim() == 2 && tokens.size(1) > 1) {
      TORCH_CHECK(last.has_value(), "DecodeStep.run: a chunk of ", tokens.size(1),
                  " tokens per row needs each row's last token");
    }
    at::Tensor h = hidden(tokens, positions, keys, values, slot_pos, spans, "DecodeStep.run");
    if (tokens.dim() == 2 && tokens.size(1) > 1) {
      h = last_rows(h, tokens.size(0), tokens.size(1), *last);
    }
    return decode_logits_impl(h, norm_, output_, eps_);
  }

  std::tuple<std::vector<int64_t>, std::vector<double>> greedy(
      const at::Tensor& tokens, const at::Tensor& positions, std::vector<at::Tensor> keys,
      std::vector<at::Tensor> values, std::vector<at::Tensor> slot_pos,
      std::vector<int64_t> spans) const {
    TORCH_CHECK(tokens.dim() == 1, "DecodeStep.greedy: expected one token per row, got ",
                tokens.sizes());
    const at::Tensor logits = run(tokens, positions, std::move(keys), std::move(values),
                                  std::move(slot_pos), std::move(spans), std::nullopt);
    return greedy_rows(logits);
  }

  std::tuple<std::vector<int64_t>, std::vector<double>> verify(
      const at::Tensor& tokens, const at::Tensor& positions, std::vector<at::Tensor> keys,
      std::vector<at::Tensor> values, std::vector<at::Tensor> slot_pos,
      std::vector<int64_t> spans) const {
    TORCH_CHECK(tokens.dim() == 2, "DecodeStep.verify: expected (B, T) tokens, got ",
                tokens.sizes());
    const at::Tensor h =
        hidden(tokens, positions, keys, values, slot_pos, spans, "DecodeStep.verify");
    return greedy_rows(decode_logits_impl(h, norm_, output_, eps_));
  }

 private:
  // Every layer over `tokens` (their keys and values written into the cache): the last
  // hidden state of each token, (B * T, dim) row-major. `what`: the method, for errors.
  at::Tensor hidden(const at::Tensor& tokens, const at::Tensor& positions,
                    std::vector<at::Tensor>& keys, std::vector<at::Tensor>& values,
                    std::vector<at::Tensor>& slot_pos, const std::vector<int64_t>& spans,
                    const char* what) const {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), what,
                ": expected the keys and values of ", layers_.size(), " layers");
    TORCH_CHECK(slot_pos.size() == capacity_.size() && spans.size() == capacity_.size(), what,
                ": expected a slot map and a span for each of the ", capacity_.size(),
                " groups of layers");
    TORCH_CHECK(tokens.sizes() == positions.sizes() && tokens.dim() >= 1 && tokens.dim() <= 2,
                what, ": expected tokens and positions of one shape, (B,) or (B, T)");
    TORCH_CHECK(keys[0].dim() == 4 && tokens.size(0) == keys[0].size(0), what, ": ",
                tokens.size(0), " rows of tokens for a cache of ", keys[0].size(0));
    std::vector<std::tuple<at::Tensor, at::Tensor>> plans;
    for (size_t g = 0; g < capacity_.size(); ++g) {
      plans.push_back(decode_slots(positions, slot_pos[g], capacity_[g], window_[g], spans[g]));
    }
    at::Tensor h = embed(tokens, what);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const auto& [slot, allowed] = plans[layer_group_[i]];
      const Layer& layer = layers_[i];
      h = decode_layer_impl(h, layer.attention_norm, layer.ffn_norm, layer.weights, eps_,
                            positions, inv_freq_, keys[i], values[i], spans[layer_group_[i]],
                            slot, allowed);
    }
    return h;
  }

  // The embedding rows of `tokens`, in the table's dtype (`F.embedding`).
  at::Tensor embed(const at::Tensor& tokens, const char* what) const {
    TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(), what,
                ": expected contiguous int64 tokens");
    const int64_t n = tokens.numel(), vocab = embedding_.size(0), dim = embedding_.size(1);
    const int64_t bytes = dim * static_cast<int64_t>(embedding_.element_size());
    at::Tensor h = at::empty({n, dim}, embedding_.options());
    const int64_t* ids = tokens.data_ptr<int64_t>();
    for (int64_t r = 0; r < n; ++r) {
      TORCH_CHECK(ids[r] >= 0 && ids[r] < vocab, what, ": token ", ids[r],
                  " is outside the vocabulary of ", vocab);
      std::memcpy(static_cast<char*>(h.data_ptr()) + r * bytes,
                  static_cast<const char*>(embedding_.data_ptr()) + ids[r] * bytes, bytes);
    }
    return h;
  }

  // Row `last[b]` of each row b's T tokens: (B * T, dim) -> (B, dim).
  static at::Tensor last_rows(const at::Tensor& h, int64_t B, int64_t T,
                              const at::Tensor& last) {
    TORCH_CHECK(last.scalar_type() == at::kLong && last.numel() == B && last.is_contiguous(),
                "DecodeStep.run: expected ", B, " int64 last-token indices");
    const int64_t dim = h.size(1), bytes = dim * static_cast<int64_t>(h.element_size());
    at::Tensor out = at::empty({B, dim}, h.options());
    const int64_t* at_row = last.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(at_row[b] >= 0 && at_row[b] < T, "DecodeStep.run: row ", b, "'s last token ",
                  at_row[b], " is outside its ", T);
      std::memcpy(static_cast<char*>(out.data_ptr()) + b * bytes,
                  static_cast<const char*>(h.data_ptr()) + (b * T + at_row[b]) * bytes, bytes);
    }
    return out;
  }

  at::Tensor embedding_, norm_;
  std::vector<Layer> layers_;
  std::vector<Weight> output_;
  double eps_;
  at::Tensor inv_freq_;
  std::vector<int64_t> layer_group_, capacity_, window_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tramontane, m) {
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<int64_t>, std::vector<int64_t>, at::Tensor,
                       std::vector<at::Tensor>, int64_t, int64_t, double, at::Tensor,
                       std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>>())
      .def("run", &DecodeStep::run)
      .def("greedy", &DecodeStep::greedy)
      .def("verify", &DecodeStep::verify);
  m.def("greedy(Tensor logits) -> (int[], float[])");
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("greedy", &greedy_rows);
}
