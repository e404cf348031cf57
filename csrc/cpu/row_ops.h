// Host-side helpers of the fused CPU row ops (bias_gelu, bias_residual, bias_residual_layernorm, patch_merging_norm):
// their compute dtype, their thread-parallel loop over rows, and per-thread column sums (bias and LayerNorm
// parameter gradients) reduced in double.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace vitkernels {
namespace cpu {

// The kernels compute in float (double for double inputs); half tensors are converted around them whole, bfloat16
// ones a few rows at a time through float scratch (row_ops_bf16.h) or, for bias_gelu, in the kernel's registers.
inline at::ScalarType row_op_compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x as a contiguous tensor of the compute type (no copy when it already is one).
inline at::Tensor as_compute(const at::Tensor& x, at::ScalarType type) { return x.to(type).contiguous(); }

// An optional operand (a bias, a scale, LayerNorm's affine) as a contiguous tensor of the compute type, kept alive in
// `keep`: its data, or null without one.
template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t, at::ScalarType type, at::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = as_compute(*t, type);
  return keep.const_data_ptr<T>();
}

// The row statistics of rows of width 0 as ATen's LayerNorm gives them (mean 0, rstd NaN): the kernels never run on
// such rows, and the statistics must not be left uninitialised.
inline void empty_row_statistics(at::Tensor& mean, at::Tensor& rstd) {
  mean.zero_();
  rstd.fill_(std::numeric_limits<double>::quiet_NaN());
}

// (mean, rstd) for the rows of y (..., C), uninitialised but for rows of width 0 (empty_row_statistics): what the
// LayerNorm row ops' kernels write one value per row into.
inline std::pair<at::Tensor, at::Tensor> row_statistics(const at::Tensor& y, at::ScalarType type) {
  const auto stats_shape = y.sizes().slice(0, y.dim() - 1);
  at::Tensor mean = at::empty(stats_shape, y.options().dtype(type));
  at::Tensor rstd = at::empty(stats_shape, y.options().dtype(type));
  if (y.size(-1) == 0) empty_row_statistics(mean, rstd);  // rows of width 0: no kernel writes them
  return {mean, rstd};
}

// Rows per parallel task: about 64 KB of a row-major tensor of `cols` elements per task.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Rows a kernel call sums in T before its partial column sums are added into the thread's double sums.
constexpr int64_t kRowBlock = 256;

// fn(begin, end, partial) over blocks of at most kRowBlock rows of [0, rows), in parallel; `partial` holds
// `sums * cols` zeros of T for the kernel to add column sums into. Returns the sums over all rows, in double,
// (sums, cols) row-major. A task takes at least 256 KB of rows (each pays for its partial sums and their reduction);
// a grain of kRowBlock rows, as before, ran every backward of fewer rows than that on one thread (Swin-T stage 4 at
// batch 4: 196 rows of 3072, the bias + GELU backward at 1.8x its two-thread time).
template <typename T, typename Fn>
std::vector<double> parallel_rows_with_column_sums(int64_t rows, int64_t cols, int64_t sums, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> per_thread(threads * sums * cols, 0.0);
  at::parallel_for(0, rows, 4 * row_grain(cols), [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "thread ", tid, " beyond the ", threads, " expected");
    std::vector<T> partial(sums * cols);
    double* total = per_thread.data() + tid * sums * cols;
    for (int64_t b = begin; b < end; b += kRowBlock) {
      std::fill(partial.begin(), partial.end(), T(0));
      fn(b, std::min(end, b + kRowBlock), partial.data());
      for (int64_t i = 0; i < sums * cols; ++i) total[i] += static_cast<double>(partial[i]);
    }
  });
  std::vector<double> out(sums * cols, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < sums * cols; ++i) out[i] += per_thread[t * sums * cols + i];
  return out;
}

// Row k of a (sums, n) row-major vector of double column sums (parallel_rows_with_column_sums) as an (n) tensor of
// `type` on `like`'s device: a parameter's gradient in the parameter's dtype.
inline at::Tensor column_sums_tensor(const std::vector<double>& sums, int64_t k, int64_t n, const at::Tensor& like,
                                     at::ScalarType type) {
  TORCH_CHECK(static_cast<int64_t>(sums.size()) >= (k + 1) * n, "column_sums_tensor: row ", k, " of ", n,
              " beyond the ", sums.size(), " sums");
  at::Tensor t = at::empty({n}, like.options().dtype(at::kDouble));
  std::copy(sums.begin() + k * n, sums.begin() + (k + 1) * n, t.mutable_data_ptr<double>());
  return t.to(type);
}

// Checks shared with bias_residual_layernorm: y and residual (..., C) alike, bias (C), scale (y.size(0)).
inline void check_bias_residual_args(const char* op, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                              const at::Tensor& residual, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(y.dim() >= 2 && at::isFloatingType(y.scalar_type()), op,
              ": y must be a floating (N, ..., C) tensor, got ", y.scalar_type(), " ", y.sizes());
  TORCH_CHECK(residual.sizes() == y.sizes() && residual.scalar_type() == y.scalar_type(), op, ": residual must be ",
              y.scalar_type(), " ", y.sizes(), " like y, got ", residual.scalar_type(), " ", residual.sizes());
  TORCH_CHECK(residual.device() == y.device(), op, ": residual must be on y's device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == y.size(-1) && at::isFloatingType(bias->scalar_type()), op,
                ": bias must be a floating (", y.size(-1), ") tensor, got ", bias->sizes());
    TORCH_CHECK(bias->device() == y.device(), op, ": bias must be on y's device");
  }
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == y.size(0) && at::isFloatingType(scale->scalar_type()), op,
                ": scale must hold one floating value per sample (", y.size(0), "), got ", scale->sizes());
    TORCH_CHECK(scale->device() == y.device(), op, ": scale must be on y's device");
  }
}

// Checks shared by the LayerNorm row ops: weight and ln_bias, where given, floating (C) tensors on y's device.
inline void check_layernorm_args(const char* op, const at::Tensor& y, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& ln_bias) {
  for (const auto* t : {&weight, &ln_bias}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == y.size(-1) && at::isFloatingType((*t)->scalar_type()), op,
                ": weight and ln_bias must be floating (", y.size(-1), ") tensors, got ", (*t)->sizes());
    TORCH_CHECK((*t)->device() == y.device(), op, ": weight and ln_bias must be on y's device");
  }
}

}  // namespace cpu
}  // namespace vitkernels
