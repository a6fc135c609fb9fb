// The ops of the C++ kernels that are not the decode step's (`torch.ops.tramontane.*`;
// kernels.py builds, loads and describes them, and holds the pure-PyTorch fallbacks and the
// shapes for torch.compile): the one-row products of bfloat16, int8 and int4 weights
// (`gemv_*`, products.cpp computes them), and the instruction sets, the prefetch distance and
// the row sharing the loops use, which the tests and the benchmarks set.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "products.h"
#include "row_shares.h"
#include "simd.h"

namespace {

using namespace tramontane;

// ------------------------------------------------------------------------------------------
// Ops

// The input rows, float32: x holds `rows` rows of k values (1 when decoding; a few when a
// keystroke's prompt grows by a few tokens).
struct Rows {
  int64_t count, k;
  Float32Values values;  // count x k
  const float* row(int64_t m) const { return values.data() + m * k; }
};

Rows input_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(k > 0 && x.numel() % k == 0 && x.numel() / k >= 1 &&
                  x.numel() / k <= kMaxInputRows,
              "expected 1 to ", kMaxInputRows, " rows of ", k, " values, got ", x.sizes());
  return Rows{x.numel() / k, k, Float32Values(x)};
}

// The products' results, in the input's dtype: the loops write float32 rows (`row`), which
// `finish` converts in place of a tensor op, as `input_rows` reads.
class Outputs {
 public:
  Outputs(const at::Tensor& x, const std::vector<Weight>& ws, int64_t inputs)
      : f32_(x.scalar_type() == at::kFloat) {
    for (const Weight& w : ws) {
      ys_.push_back(at::empty({inputs, w.rows()}, x.options()));
      scratch_.emplace_back(f32_ ? 0 : inputs * w.rows());
      rows_.push_back(f32_ ? ys_.back().data_ptr<float>() : scratch_.back().data());
    }
  }

  // Where each matrix's results go (count x its rows, float32).
  const std::vector<float*>& rows() const { return rows_; }

  std::vector<at::Tensor> finish() {
    if (f32_) return ys_;
    for (size_t i = 0; i < ys_.size(); ++i) {
      const std::vector<float>& from = scratch_[i];
      if (ys_[i].scalar_type() == at::kBFloat16) {
        at::BFloat16* to = ys_[i].data_ptr<at::BFloat16>();
        for (size_t j = 0; j < from.size(); ++j) to[j] = at::BFloat16(from[j]);
      } else {
        ys_[i].copy_(at::from_blob(const_cast<float*>(from.data()), ys_[i].sizes(),
                                   at::TensorOptions().dtype(at::kFloat)));
      }
    }
    return ys_;
  }

 private:
  bool f32_;
  std::vector<at::Tensor> ys_;
  std::vector<std::vector<float>> scratch_;
  std::vector<float*> rows_;
};

std::vector<at::Tensor> gemv_many(const at::Tensor& x, std::vector<Weight> ws,
                                  const char* what) {
  TORCH_CHECK(!ws.empty(), what, ": no weights");
  for (const Weight& w : ws) check_operands(w, what);
  const int64_t k = ws[0].inputs();
  for (const Weight& w : ws) {
    TORCH_CHECK(w.inputs() == k, what, ": the weights take different numbers of inputs");
  }
  const Rows xs = input_rows(x, k);
  Outputs ys(x, ws, xs.count);
  products(xs.values.data(), xs.count, k, ws, ys.rows());
  return ys.finish();
}

std::vector<at::Tensor> gemv_bf16_many(const at::Tensor& x, at::TensorList ws) {
  std::vector<Weight> weights;
  for (const at::Tensor& w : ws) weights.push_back({Kind::kBF16, w, {}, {}, 0});
  return gemv_many(x, std::move(weights), "gemv_bf16");
}

std::vector<at::Tensor> gemv_int8_many(const at::Tensor& x, at::TensorList qs,
                                       at::TensorList scales) {
  TORCH_CHECK(scales.size() == qs.size(), "gemv_int8: one scale tensor per weight");
  std::vector<Weight> weights;
  for (size_t i = 0; i < qs.size(); ++i) weights.push_back({Kind::kInt8, qs[i], scales[i], {}, 0});
  return gemv_many(x, std::move(weights), "gemv_int8");
}

std::vector<at::Tensor> gemv_int4_many(const at::Tensor& x, at::TensorList qs,
                                       at::TensorList scales, at::TensorList zeros,
                                       int64_t group) {
  TORCH_CHECK(scales.size() == qs.size() && zeros.size() == qs.size(),
              "gemv_int4: one scale and one zero tensor per weight");
  std::vector<Weight> weights;
  for (size_t i = 0; i < qs.size(); ++i) {
    TORCH_CHECK(scales[i].scalar_type() == scales[0].scalar_type(),
                "gemv_int4: the scales of all weights must have one dtype");
    weights.push_back({Kind::kInt4, qs[i], scales[i], zeros[i], group});
  }
  return gemv_many(x, std::move(weights), "gemv_int4");
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  return gemv_bf16_many(x, {w})[0];
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  return gemv_int8_many(x, {q}, {scale})[0];
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     const at::Tensor& zero, int64_t group) {
  return gemv_int4_many(x, {q}, {scale}, {zero}, group)[0];
}

const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

std::string instruction_set() { return kIsaNames[static_cast<int>(isa())]; }

// Run the loops of `name` (or a lower set, where the CPU has nothing better) from now on, in
// every kernel of the library: the tests and benchmarks compare the sets in one process. What
// ran before is returned.
std::string cap_instruction_set(const std::string& name) {
  const std::string before = instruction_set();
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      cap_isa(static_cast<Isa>(i));
      return before;
    }
  }
  TORCH_CHECK(false, "unknown instruction set '", name, "' (portable, avx2 or avx512)");
}

// How far ahead the loops that stream a weight prefetch it (simd.h's `stream_ahead`), in bytes
// (0: not at all), from now on; the distance before is returned.
int64_t set_stream_ahead(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= (1 << 20) && bytes % 64 == 0,
              "stream_ahead: expected a multiple of 64 bytes from 0 to 1 MiB, got ", bytes);
  return stream_ahead_bytes.exchange(bytes);
}

// Whether the products' threads take rows from each other's shares (row_shares.h) from now
// on; what was set before is returned.
bool set_balanced_rows(bool on) { return balanced_rows.exchange(on); }

std::vector<std::string> cpu_instruction_sets() {
  std::vector<std::string> out;
  for (int i = static_cast<int>(cpu_isa()); i >= 0; --i) out.emplace_back(kIsaNames[i]);
  return out;
}

// How many threads `at::parallel_for` runs a two-thread-or-more range on here: torch's
// intra-op threads when this library was compiled with OpenMP, else 1 (the pragma inside the
// header template is then ignored and every product runs on the calling thread).
int64_t parallel_threads() {
  std::vector<int64_t> seen(std::max<int64_t>(at::get_num_threads(), 1), 0);
  at::parallel_for(0, static_cast<int64_t>(seen.size()), 1, [&](int64_t r0, int64_t r1) {
    const int64_t t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int64_t>(seen.size())) seen[t] = 1;
    (void)r0, (void)r1;
  });
  int64_t used = 0;
  for (int64_t s : seen) used += s;
  return used;
}

}  // namespace

TORCH_LIBRARY(tramontane, m) {
  m.def("instruction_set() -> str");
  m.def("cap_instruction_set(str name) -> str");
  m.def("cpu_instruction_sets() -> str[]");
  m.def("parallel_threads() -> int");
  m.def("set_stream_ahead(int bytes) -> int");
  m.def("set_balanced_rows(bool on) -> bool");
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor q, Tensor scale, Tensor zero, int group) -> Tensor");
  m.def("gemv_bf16_many(Tensor x, Tensor[] ws) -> Tensor[]");
  m.def("gemv_int8_many(Tensor x, Tensor[] qs, Tensor[] scales) -> Tensor[]");
  m.def("gemv_int4_many(Tensor x, Tensor[] qs, Tensor[] scales, Tensor[] zeros, int group) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(tramontane, CompositeExplicitAutograd, m) {
  m.impl("instruction_set", &instruction_set);
  m.impl("cap_instruction_set", &cap_instruction_set);
  m.impl("cpu_instruction_sets", &cpu_instruction_sets);
  m.impl("parallel_threads", &parallel_threads);
  m.impl("set_stream_ahead", &set_stream_ahead);
  m.impl("set_balanced_rows", &set_balanced_rows);
}

TORCH_LIBRARY_IMPL(tramontane, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("gemv_bf16_many", &gemv_bf16_many);
  m.impl("gemv_int8_many", &gemv_int8_many);
  m.impl("gemv_int4_many", &gemv_int4_many);
}
