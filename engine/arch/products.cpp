// The one-row products that stream a weight matrix once, at the memory limit (`products`,
// products.h): bfloat16, float32, int8 (one scale per row) and int4 (two codes per byte, low
// nibble first; a scale and a zero per group of input channels), any mix of them against the
// same input rows in one call, and the checks of their operands. kernels.cpp registers them
// as ops; the decode step's layers (decode_layer.cpp) call them directly.
//
// Each row is one dot product over a contiguous stretch of the weight, so the whole matrix is
// read as one sequential stream (the hardware prefetchers' best case); rows are shared among
// torch's intra-op threads (row_shares.h). The activation row is converted once per call and
// stays in L1/L2. AVX-512 (with VNNI) or AVX2+FMA code is chosen at run time where the CPU
// has it (simd.h's `isa`); elsewhere the same loops in plain C++ (the compiler vectorises what
// it can). The loops are in product_loops.h and product_loops_avx512.h, the input rows they
// read in input_rows.h.

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
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
constexpr int64_t kClaimBytes = 32 << 10;  // weight bytes a thread claims at least (for_rows)

void check_weight(const at::Tensor& w, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  w.scalar_type() == dtype,
              what, ": expected a contiguous 2-D CPU tensor of ", dtype, ", got ",
              w.scalar_type(), " ", w.sizes());
}

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

// Several matrices of the same input rows (a layer's query, key and value projections; the
// gate and up projections of a feed-forward) in one call: their rows are one range shared
// among the threads, so the call pays one fork and join, and the input rows are converted
// (and for int8 and int4 quantized) once. fn(i, m, r0, r1): rows r0..r1 of matrix i against
// input row m and, where its loop takes several input rows at once, the ones after it: it
// returns how many it did. With several input rows, each block of kBlock weight rows is read
// from memory once and from L1 (or registers) for the other input rows: the weights are
// streamed once per call.
//
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
  TORCH_CHECK(count >= 1 && count <= kMaxInputRows, "expected 1 to ", kMaxInputRows, " input rows, got ",
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

}  // namespace

namespace tramontane {

void check_operands(const Weight& w, const char* what) {
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
    check_operands(w, what);
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
