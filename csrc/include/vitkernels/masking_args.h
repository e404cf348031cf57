// Argument checks of the MAE / MSN masking ops, shared by the CPU and CUDA torch bindings (csrc/cpu/masking.cpp,
// csrc/cuda/masking.cpp) so both refuse the same calls with the same messages: ranks, shapes, dtypes and devices of
// every tensor argument, optional ones included. These are what make direct torch.ops.vitkernels.* calls and
// torch.compile'd calls (which skip the Python checks) safe. The checks of index *values* (permutations, inverse
// pairs) need the data on the host: csrc/cpu/masking.cpp does them; the CUDA binding masks instead (see there).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/promote_types.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace vitkernels {
namespace masking_args {

inline void check_floating(const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), op, ": ", name, " must be a floating tensor / dtype, got ", dtype);
}

inline void check_index(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
              " must be an int64 or int32 tensor, got ", t.scalar_type());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

// An embedding added per row: (1 or N, rows, D), floating, on like's device.
inline void check_embedding(const char* op, const char* name, const at::Tensor& t, int64_t N, int64_t rows,
                            int64_t D, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == N) && t.size(1) == rows && t.size(2) == D, op, ": ",
              name, " must be (1, ", rows, ", ", D, ") or (", N, ", ", rows, ", ", D, "), got ", t.sizes());
  check_floating(op, name, t.scalar_type());
  check_device(op, name, t, like);
}

inline at::ScalarType promoted(const at::Tensor& a, const std::optional<at::Tensor>& b) {
  return b.has_value() ? at::promote_types(a.scalar_type(), b->scalar_type()) : a.scalar_type();
}

// gather_rows(src (N, S, D), idx (K,) or (N, K), inverse_idx (S,) or (N, S) alike, add (1 or N, S, D)?, out_dtype?)
// -> the output dtype.
inline at::ScalarType check_gather_rows(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& inverse_idx,
                                        const std::optional<at::Tensor>& add,
                                        std::optional<at::ScalarType> out_dtype) {
  const char* op = "gather_rows";
  TORCH_CHECK(src.dim() == 3, op, ": src must be (N, S, D), got ", src.sizes());
  check_floating(op, "src", src.scalar_type());
  const int64_t N = src.size(0), S = src.size(1), D = src.size(2);
  TORCH_CHECK(idx.dim() == 1 || (idx.dim() == 2 && idx.size(0) == N), op, ": idx must be (K,) or (", N, ", K), got ",
              idx.sizes());
  const bool shared = idx.dim() == 1;
  // inverse_idx is what the backward gathers by: batch-shared like idx, one entry per source row.
  TORCH_CHECK(shared ? inverse_idx.dim() == 1 && inverse_idx.size(0) == S
                     : inverse_idx.dim() == 2 && inverse_idx.size(0) == N && inverse_idx.size(1) == S,
              op, ": inverse_idx must be ", shared ? "(S,)" : "(N, S)", " with N = ", N, ", S = ", S, ", got ",
              inverse_idx.sizes());
  check_index(op, "idx", idx);
  check_index(op, "inverse_idx", inverse_idx);
  check_device(op, "idx", idx, src);
  check_device(op, "inverse_idx", inverse_idx, src);
  if (add.has_value()) check_embedding(op, "add", *add, N, S, D, src);
  const at::ScalarType dtype = out_dtype.value_or(promoted(src, add));
  check_floating(op, "out_dtype", dtype);
  return dtype;
}

// random_masking(x (N, L, D), noise (N, L), len_keep in [0, L], pos_embed (1 or N, L, D)?).
inline void check_random_masking(const at::Tensor& x, const at::Tensor& noise, int64_t len_keep,
                                 const std::optional<at::Tensor>& pos_embed) {
  const char* op = "random_masking";
  TORCH_CHECK(x.dim() == 3 && noise.dim() == 2 && noise.size(0) == x.size(0) && noise.size(1) == x.size(1), op,
              ": x must be (N, L, D) and noise (N, L), got ", x.sizes(), " and ", noise.sizes());
  check_floating(op, "x", x.scalar_type());
  check_floating(op, "noise", noise.scalar_type());
  check_device(op, "noise", noise, x);
  TORCH_CHECK(len_keep >= 0 && len_keep <= x.size(1), op, ": len_keep must be in [0, ", x.size(1), "], got ",
              len_keep);
  if (pos_embed.has_value()) check_embedding(op, "pos_embed", *pos_embed, x.size(0), x.size(1), x.size(2), x);
}

// mae_unshuffle(x (N, 1 + keep, D), ids_restore (N, L) with L >= keep, mask_token (D values), pos (1|N, 1+L, D)?)
// -> the output dtype.
inline at::ScalarType check_mae_unshuffle(const at::Tensor& x, const at::Tensor& ids_restore,
                                          const at::Tensor& mask_token, const std::optional<at::Tensor>& pos_embed) {
  const char* op = "mae_unshuffle";
  TORCH_CHECK(x.dim() == 3 && x.size(1) >= 1 && ids_restore.dim() == 2 && ids_restore.size(0) == x.size(0), op,
              ": x must be (N, 1 + keep, D) and ids_restore (N, L), got ", x.sizes(), " and ", ids_restore.sizes());
  const int64_t N = x.size(0), keep = x.size(1) - 1, D = x.size(2), L = ids_restore.size(1);
  TORCH_CHECK(keep <= L, op, ": x holds ", keep, " visible tokens after CLS but ids_restore only ", L, " patches");
  check_floating(op, "x", x.scalar_type());
  check_index(op, "ids_restore", ids_restore);
  check_device(op, "ids_restore", ids_restore, x);
  TORCH_CHECK(mask_token.numel() == D, op, ": mask_token must hold D = ", D, " values, got ", mask_token.sizes());
  check_floating(op, "mask_token", mask_token.scalar_type());
  check_device(op, "mask_token", mask_token, x);
  if (pos_embed.has_value()) check_embedding(op, "pos_embed", *pos_embed, N, L + 1, D, x);
  const at::ScalarType dtype = at::promote_types(x.scalar_type(), mask_token.scalar_type());
  return pos_embed.has_value() ? at::promote_types(dtype, pos_embed->scalar_type()) : dtype;
}

// mae_unshuffle_backward(grad (N, 1 + L, D), ids_restore (N, L), keep in [0, L], x_dtype, token_dtype floating).
inline void check_mae_unshuffle_backward(const at::Tensor& grad, const at::Tensor& ids_restore, int64_t keep,
                                         at::ScalarType x_dtype, at::ScalarType token_dtype) {
  const char* op = "mae_unshuffle_backward";
  TORCH_CHECK(grad.dim() == 3 && ids_restore.dim() == 2 && grad.size(0) == ids_restore.size(0) &&
                  grad.size(1) == ids_restore.size(1) + 1,
              op, ": grad must be (N, 1 + L, D) for ids_restore (N, L), got ", grad.sizes(), " and ",
              ids_restore.sizes());
  TORCH_CHECK(keep >= 0 && keep <= ids_restore.size(1), op, ": keep must be in [0, L = ", ids_restore.size(1),
              "], got ", keep);
  check_floating(op, "grad", grad.scalar_type());
  check_floating(op, "x_dtype", x_dtype);
  check_floating(op, "token_dtype", token_dtype);
  check_index(op, "ids_restore", ids_restore);
  check_device(op, "ids_restore", ids_restore, grad);
}

}  // namespace masking_args
}  // namespace vitkernels
