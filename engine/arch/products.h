// What the C++ kernels share between their files: the one-row products of products.cpp (any
// mix of bfloat16, float32, int8 and int4 weights against the same input rows, in one fork and
// join of the threads), the decode step's attention of decode_attention.cpp and the parts of
// decode_layer.cpp, called by each other and by decode_step.cpp without the dispatcher.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace tramontane {

// How a weight is stored (the values are `decode_layer`'s `kinds`, kernels.py's `KINDS`).
enum class Kind : int64_t { kBF16 = 0, kInt8 = 1, kInt4 = 2, kFloat32 = 3 };

// One weight of a product: `w` [n, k] bfloat16, float32 or int8 (with `scale` [n] float32);
// int4: `w` [n, k / 2] uint8, two codes per byte, low nibble first, with `scale` and `zero`
// [n, k / group] (float32 or bfloat16).
struct Weight {
  Kind kind;
  at::Tensor w, scale, zero;
  int64_t group = 0;

  int64_t rows() const { return w.size(0); }
  int64_t inputs() const { return kind == Kind::kInt4 ? w.size(1) * 2 : w.size(1); }
};

// The most input rows a product call takes (kernels.py's MAX_ROWS): it streams the weights
// once for all of them; beyond, a matmul is faster (the loops are per input row).
constexpr int64_t kMaxInputRows = 16;

// Whether `w`'s tensors are what its kind takes (dtype, shape, contiguity, scales); `what`
// names the caller in the message.
void check_operands(const Weight& w, const char* what);

// The weights of `kinds.size()` products taken in order from `tensors` (1 tensor for bfloat16
// and float32, 2 for int8, 3 for int4), checked; `what` names the caller in messages.
std::vector<Weight> weights_of(at::TensorList tensors, at::IntArrayRef kinds, int64_t group,
                               const char* what);

// out[i] (count x rows of ws[i], float32) = the `count` input rows x (count x k, float32) times
// ws[i] transposed, for every i, the rows of all the weights shared among torch's threads.
void products(const float* x, int64_t count, int64_t k, const std::vector<Weight>& ws,
              const std::vector<float*>& out);

// Rows r0..r1 of a weight in float32 (r1 - r0 rows of its k inputs, contiguous), as the
// eager layers compute them (prefill_linear.cpp).
void dequantize_rows(const Weight& w, int64_t r0, int64_t r1, float* out);

// The decode step's parts (decode_layer.cpp says what each computes): a transformer block, the
// slot map and mask of a group of layers, the final norm and output projection.
at::Tensor decode_layer_impl(const at::Tensor& h, const at::Tensor& attention_norm,
                             const at::Tensor& ffn_norm, const std::vector<Weight>& ws,
                             double eps, const at::Tensor& positions,
                             const at::Tensor& inv_freq, at::Tensor& keys, at::Tensor& values,
                             int64_t span, const at::Tensor& slot, const at::Tensor& allowed);
std::tuple<at::Tensor, at::Tensor> decode_slots(const at::Tensor& positions,
                                                at::Tensor& slot_pos, int64_t capacity,
                                                int64_t window, int64_t span);
at::Tensor decode_logits_impl(const at::Tensor& h, const at::Tensor& norm,
                              const std::vector<Weight>& ws, double eps);

// `torch.ops.tramontane.decode_attention` (decode_attention.cpp says what it computes).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& keys, at::Tensor& values, const at::Tensor& slot,
                            const at::Tensor& allowed);
// T new tokens of each row (q (B, T, Hkv, G, hd), k and v (B, T, Hkv, hd) in the cache's dtype,
// slot (B * T), allowed (B * T, S)): their keys and values written, then each token's attention
// as `decode_attention` of the tokens one after the other computes it, the cache read once for
// all of them -> (B * T, Hkv, G, hd) float32. Undefined (nothing written) where that order
// matters: a token allowed to see a slot that a later token of its row writes.
at::Tensor decode_attention_tokens(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, at::Tensor& keys, at::Tensor& values,
                                   const at::Tensor& slot, const at::Tensor& allowed);

}  // namespace tramontane
