// One-row matrix-vector products that stream a weight matrix once, at the memory limit:
// bfloat16, float32, int8 (one scale per row) and int4 (two codes per byte, low nibble first;
// a scale and a zero per group of input channels), any mix of them in one call (`products`,
// products.h), and the int4 dequantization for many-row products.
// Registered as `torch.ops.tramontane.*` (kernels.py builds, loads and describes them; it
// also holds the pure-PyTorch fallbacks and the shapes for torch.compile).
//
// Each row is one dot product over a contiguous stretch of the weight, so the whole matrix is
// read as one sequential stream (the hardware prefetchers' best case); rows are shared among
// torch's intra-op threads. The activation row is converted to float32 once per call and stays
// in L1/L2. AVX-512 (with VNNI) or AVX2+FMA code is chosen at run time where the CPU has it
// (simd.h's `isa`); elsewhere the same loops in plain C++ (the compiler vectorises what it
// can). The loops are in product_loops.h and product_loops_avx512.h, the input rows they
// read in input_rows.h; this file shares the rows among the threads, checks the operands and
// registers the ops.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "input_rows.h"
#include "product_loops.h"
#include "product_loops_avx512.h"
#include "products.h"
#include "row_shares.h"
#include "simd.h"

namespace {

using namespace tramontane;
using namespace tramontane::loops;

constexpr int64_t kGrain = 16;   // weight rows per task, at least
constexpr int64_t kBlock = 4;    // weight rows read once for all the input rows (<= 24 KiB)
constexpr int64_t kMaxRows = 16;  // input rows per call: beyond, a matmul is faster
constexpr int64_t kClaimBytes = 32 << 10;  // weight bytes a thread claims at least (for_rows)

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
                  x.numel() / k <= kMaxRows,
              "expected 1 to ", kMaxRows, " rows of ", k, " values, got ", x.sizes());
  return Rows{x.numel() / k, k, Float32Values(x)};
}

void check_weight(const at::Tensor& w, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  w.scalar_type() == dtype,
              what, ": expected a contiguous 2-D CPU tensor of ", dtype, ", got ",
              w.scalar_type(), " ", w.sizes());
}

// Several matrices of the same input rows (a layer's query, key and value projections; the
// gate and up projections of a feed-forward) in one call: their rows are one range shared
// among the threads, so the call pays one fork and join, and the input rows are converted
// (and for int8 and int4 quantized) once. fn(i, m, r0, r1): rows r0..r1 of matrix i against
// input row m and, where its loop takes several input rows at once, the ones after it: it
// returns how many it did. With several input rows, each block of kBlock weight rows is read
// from memory once and from L1 (or registers) for the other input rows: the weights are
// streamed once per call.
// The rows are shared by `share_rows` (row_shares.h): claims of about kClaimBytes of weight,
// each thread its own share first, then the others' rest. (Tried on a 2-core AVX2 machine: the
// threads taking chunks of 64 rows from one shared counter, against the calling thread's 8% of
// an int4 step spent waiting at the end of products (perf): 10.4 vs 10.0 ms a step, no gain;
// the counter broke each thread's stream into chunks from the start.)
template <typename F>
void for_rows(const std::vector<int64_t>& rows, int64_t inputs, int64_t row_bytes,
              const F& fn) {
  std::vector<int64_t> start(rows.size() + 1, 0);
  for (size_t i = 0; i < rows.size(); ++i) start[i + 1] = start[i] + rows[i];
  const int64_t claim =
      std::max(kBlock, kClaimBytes / std::max<int64_t>(row_bytes, 1) / kBlock * kBlock);
  share_rows(start.back(), claim, kBlock, kGrain, [&](int64_t r0, int64_t r1) {
    for (size_t i = 0; i < rows.size(); ++i) {
      const int64_t a = std::max(r0, start[i]) - start[i];
      const int64_t b = std::min(r1, start[i + 1]) - start[i];
      for (int64_t r = a; r < b; r += kBlock) {
        for (int64_t m = 0; m < inputs;) m += fn(i, m, r, std::min(r + kBlock, b));
      }
    }
  });
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

void check_int4(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                int64_t group) {
  check_weight(q, at::kByte, "int4");
  const int64_t n = q.size(0), k = q.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 2 == 0 && k % group == 0, "int4: group ", group,
              " does not divide ", k, " inputs");
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK((t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                    t->scalar_type() == scale.scalar_type() && t->is_contiguous() &&
                    t->numel() == n * (k / group),
                "int4: expected float32 or bfloat16 scales and zeros of ", n, " x ", k / group);
  }
}

void check(const Weight& w, const char* what) {
  switch (w.kind) {
    case Kind::kBF16: return check_weight(w.w, at::kBFloat16, what);
    case Kind::kFloat32: return check_weight(w.w, at::kFloat, what);
    case Kind::kInt8:
      check_weight(w.w, at::kChar, what);
      TORCH_CHECK(w.scale.numel() == w.rows() && w.scale.scalar_type() == at::kFloat &&
                      w.scale.is_contiguous(),
                  what, ": expected ", w.rows(), " float32 scales");
      return;
    case Kind::kInt4: return check_int4(w.w, w.scale, w.zero, w.group);
  }
}

// f(std::integral_constant<int, n>) for n = 2 to 4: a loop's count of input rows as a template
// argument.
template <typename F>
void by_count(int64_t n, const F& f) {
  switch (n) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 2>{});
  }
}

template <typename S>
void int4_run(const Int4Row& x4, const uint8_t* qp, const S* sp, const S* zp, float* yp,
              int64_t k, int64_t group, Isa isa, int64_t r0, int64_t r1) {
#ifdef TRAMONTANE_X86
  if (isa == Isa::kAvx512) {
    return int4_rows_avx512(qp, sp, zp, x4.codes.data(), x4.xscale.data(), x4.gsum.data(), yp,
                            k, r0, r1);
  }
  if (isa == Isa::kAvx2) {
    return int4_rows_avx2(qp, sp, zp, x4.codes.data(), x4.xscale.data(), x4.gsum.data(), yp,
                          k, r0, r1);
  }
#endif
  (void)isa;
  int4_rows(qp, sp, zp, x4.xe.data(), x4.xo.data(), x4.gsum.data(), yp, k, group, r0, r1);
}

void products_impl(const float* x, int64_t count, int64_t k, const std::vector<Weight>& ws,
                   const std::vector<float*>& out) {
  TORCH_CHECK(count >= 1 && count <= kMaxRows, "expected 1 to ", kMaxRows, " input rows, got ",
              count);
  const Isa isa = tramontane::isa();
  bool int8 = false;
  int64_t group = 0;  // the int4 weights' (one for all of them)
  std::vector<int64_t> rows;
  for (const Weight& w : ws) {
    TORCH_CHECK(w.inputs() == k, "the weights take different numbers of inputs");
    int8 |= w.kind == Kind::kInt8;
    if (w.kind == Kind::kInt4) {
      TORCH_CHECK(group == 0 || group == w.group, "the int4 weights of one call must have one "
                  "group size");
      group = w.group;
    }
    rows.push_back(w.rows());
  }
  // The activations as each kind of loop takes them, once for all the weights.
  std::vector<AlignedVector<int16_t>> x16(int8 && isa >= Isa::kAvx2 ? count : 0);
  std::vector<float> xscale(count, 0.f);
  for (size_t m = 0; m < x16.size(); ++m) x16[m] = quantize_row(x + m * k, k, &xscale[m], isa);
  // bfloat16 weights: on AVX-512 with BF16, rows of bfloat16 values take its dot products
  // (xb); other rows, and AVX2, the arranged float32 row (xa).
  const bool bf16 = std::any_of(ws.begin(), ws.end(),
                                [](const Weight& w) { return w.kind == Kind::kBF16; });
  std::vector<AlignedVector<float>> xa(bf16 ? count : 0);
  std::vector<AlignedVector<uint16_t>> xb(bf16 ? count : 0);
  for (int64_t m = 0; bf16 && isa >= Isa::kAvx2 && m < count; ++m) {
    if (has_avx512_bf16()) xb[m] = bf16_row(x + m * k, k);
    if (xb[m].empty()) xa[m] = arranged_row(x + m * k, k);
  }
  const Isa int4_isa = group == 32 ? isa : Isa::kPortable;  // the vector loops: groups of 32
  std::vector<Int4Row> x4;
  for (int64_t m = 0; group != 0 && m < count; ++m) {
    x4.push_back(int4_row(x + m * k, k, group, int4_isa));
  }
  // The weights' storage, taken once: `data_ptr<T>()` checks the dtype at every call, and
  // the loop below runs once per block of kBlock rows (perf: 5% of an int4 step's samples
  // were in `data_ptr` and its checks).
  struct Raw {
    const void *w, *scale, *zero;
    bool f32_scales;
  };
  std::vector<Raw> raw;
  for (const Weight& w : ws) {
    raw.push_back({w.w.data_ptr(), w.scale.defined() ? w.scale.data_ptr() : nullptr,
                   w.zero.defined() ? w.zero.data_ptr() : nullptr,
                   w.scale.defined() && w.scale.scalar_type() == at::kFloat});
  }
  // Loops that take up to 4 input rows at once, each weight load serving all of them: BF16's
  // dot products (`bf16_rows_dot_n`, for bfloat16 rows of bfloat16 values: `dot_run[m]` says
  // how many from input row m on have theirs) and the AVX-512 int8 and int4 loops (any rows).
  std::vector<int64_t> dot_run(count + 1, 0);
  for (int64_t m = count - 1; m >= 0 && !xb.empty(); --m) {
    dot_run[m] = xb[m].empty() ? 0 : std::min<int64_t>(4, dot_run[m + 1] + 1);
  }
  const auto run = [&](size_t i, int64_t m) -> int64_t {
    const int64_t rest = std::min<int64_t>(4, count - m);
    switch (ws[i].kind) {
      case Kind::kBF16: return dot_run[m];
      case Kind::kInt8: return isa == Isa::kAvx512 ? rest : 1;
      case Kind::kInt4: return int4_isa == Isa::kAvx512 ? rest : 1;
      case Kind::kFloat32: return 1;
    }
    return 1;
  };
  // One weight's rows r0..r1 against input row m.
  const auto one = [&](size_t i, int64_t m, int64_t r0, int64_t r1) {
    const Raw& w = raw[i];
    const float* xm = x + m * k;
    float* yp = out[i] + m * rows[i];
    switch (ws[i].kind) {
      case Kind::kBF16: {
        const uint16_t* wp = static_cast<const uint16_t*>(w.w);
#ifdef TRAMONTANE_X86
        if (!xb.empty() && !xb[m].empty()) return bf16_rows_dot(wp, xb[m].data(), yp, k, r0, r1);
        if (isa >= Isa::kAvx2) return bf16_rows_avx2(wp, xa[m].data(), yp, k, r0, r1);
#endif
        return float_rows(wp, xm, yp, k, r0, r1);
      }
      case Kind::kFloat32: {
        const float* wp = static_cast<const float*>(w.w);
#ifdef TRAMONTANE_X86
        if (isa >= Isa::kAvx2) return f32_rows_avx2(wp, xm, yp, k, r0, r1);
#endif
        return float_rows(wp, xm, yp, k, r0, r1);
      }
      case Kind::kInt8: {
        const int8_t* qp = static_cast<const int8_t*>(w.w);
        const float* sp = static_cast<const float*>(w.scale);
#ifdef TRAMONTANE_X86
        if (isa == Isa::kAvx512) {
          return int8_rows_avx512(qp, sp, x16[m].data(), xscale[m], yp, k, r0, r1);
        }
        if (isa == Isa::kAvx2) {
          return int8_rows_avx2(qp, sp, x16[m].data(), xscale[m], yp, k, r0, r1);
        }
#endif
        return int8_rows(qp, sp, xm, yp, k, r0, r1);
      }
      case Kind::kInt4: {
        const uint8_t* qp = static_cast<const uint8_t*>(w.w);
        if (w.f32_scales) {
          return int4_run(x4[m], qp, static_cast<const float*>(w.scale),
                          static_cast<const float*>(w.zero), yp, k, group, int4_isa, r0, r1);
        }
        return int4_run(x4[m], qp, static_cast<const uint16_t*>(w.scale),
                        static_cast<const uint16_t*>(w.zero), yp, k, group, int4_isa, r0, r1);
      }
    }
  };
  // Rows r0..r1 of weight i against input rows m..m+n-1 (n = 2 to 4) in one loop.
  const auto several = [&](size_t i, int64_t m, int64_t n, int64_t r0, int64_t r1) {
#ifdef TRAMONTANE_X86
    const Raw& w = raw[i];
    float* ys[4];
    for (int64_t j = 0; j < n; ++j) ys[j] = out[i] + (m + j) * rows[i];
    switch (ws[i].kind) {
      case Kind::kBF16: {
        const uint16_t* xs[4];
        for (int64_t j = 0; j < n; ++j) xs[j] = xb[m + j].data();
        const uint16_t* wp = static_cast<const uint16_t*>(w.w);
        return by_count(n, [&](auto rows_at_once) {
          constexpr int N = decltype(rows_at_once)::value;
          bf16_rows_dot_n<N>(wp, xs, ys, k, r0, r1);
        });
      }
      case Kind::kInt8: {
        const int16_t* xs[4];
        for (int64_t j = 0; j < n; ++j) xs[j] = x16[m + j].data();
        const int8_t* qp = static_cast<const int8_t*>(w.w);
        const float* sp = static_cast<const float*>(w.scale);
        return by_count(n, [&](auto rows_at_once) {
          constexpr int N = decltype(rows_at_once)::value;
          int8_rows_avx512_n<N>(qp, sp, xs, xscale.data() + m, ys, k, r0, r1);
        });
      }
      case Kind::kInt4: {
        Int4Input xs[4];
        for (int64_t j = 0; j < n; ++j) {
          xs[j] = {x4[m + j].codes.data(), x4[m + j].xscale.data(), x4[m + j].gsum.data()};
        }
        const uint8_t* qp = static_cast<const uint8_t*>(w.w);
        return by_count(n, [&](auto rows_at_once) {
          constexpr int N = decltype(rows_at_once)::value;
          if (w.f32_scales) {
            int4_rows_avx512_n<N>(qp, static_cast<const float*>(w.scale),
                                  static_cast<const float*>(w.zero), xs, ys, k, r0, r1);
          } else {
            int4_rows_avx512_n<N>(qp, static_cast<const uint16_t*>(w.scale),
                                  static_cast<const uint16_t*>(w.zero), xs, ys, k, r0, r1);
          }
        });
      }
      case Kind::kFloat32: break;
    }
#endif
    TORCH_CHECK(false, "no loop takes ", n, " input rows of this weight at once");
  };
  int64_t bytes = 0, all_rows = 0;  // a weight row's bytes, on average
  for (const Weight& w : ws) bytes += w.w.nbytes(), all_rows += w.rows();
  const int64_t row_bytes = bytes / std::max<int64_t>(all_rows, 1);
  for_rows(rows, count, row_bytes, [&](size_t i, int64_t m, int64_t r0, int64_t r1) -> int64_t {
    const int64_t n = run(i, m);
    if (n > 1) {
      several(i, m, n, r0, r1);
      return n;
    }
    one(i, m, r0, r1);
    return 1;
  });
}

std::vector<at::Tensor> gemv_many(const at::Tensor& x, std::vector<Weight> ws,
                                  const char* what) {
  TORCH_CHECK(!ws.empty(), what, ": no weights");
  for (const Weight& w : ws) check(w, what);
  const int64_t k = ws[0].inputs();
  for (const Weight& w : ws) {
    TORCH_CHECK(w.inputs() == k, what, ": the weights take different numbers of inputs");
  }
  const Rows xs = input_rows(x, k);
  Outputs ys(x, ws, xs.count);
  products_impl(xs.values.data(), xs.count, k, ws, ys.rows());
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

namespace tramontane {

std::vector<Weight> weights_of(at::TensorList tensors, at::IntArrayRef kinds, int64_t group,
                               const char* what) {
  std::vector<Weight> ws;
  size_t at = 0;
  auto next = [&]() -> const at::Tensor& {
    TORCH_CHECK(at < tensors.size(), what, ": fewer weight tensors than their kinds take");
    return tensors[at++];
  };
  for (const int64_t kind : kinds) {
    TORCH_CHECK(kind >= 0 && kind <= 3, what, ": unknown weight kind ", kind);
    Weight w{static_cast<Kind>(kind), next(), {}, {}, 0};
    if (w.kind == Kind::kInt8 || w.kind == Kind::kInt4) w.scale = next();
    if (w.kind == Kind::kInt4) {
      w.zero = next();
      w.group = group;
    }
    check(w, what);
    ws.push_back(std::move(w));
  }
  TORCH_CHECK(at == tensors.size(), what, ": more weight tensors than their kinds take");
  return ws;
}

void products(const float* x, int64_t count, int64_t k, const std::vector<Weight>& ws,
              const std::vector<float*>& out) {
  products_impl(x, count, k, ws, out);
}

}  // namespace tramontane

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
