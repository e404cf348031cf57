// MAE / MSN token masking on CPU (semantics: vitkernels/reference/masking.py), the same four ops as the Triton
// backend so that vitkernels/ops/masking.py registers one set of fakes and autograd for both:
//   gather_rows            out[n, k] = src[n, idx[n, k]] (+ add[0 or n, idx[n, k]]), 0 where idx is out of range
//   random_masking         stable sort of the noise -> ids_restore, ids_keep, mask; kept tokens (+ pos) gathered
//   mae_unshuffle          decoder input: CLS, then visible token or mask token per position (+ decoder pos)
//   mae_unshuffle_backward the scatter back to the visible tokens and the mask token's gradient (a sum)
// Every output row is produced by one contiguous row copy/add, rows split across threads.
//
// Every index the kernels follow is validated here (these entry points are reachable from torch.compile'd code and
// direct torch.ops.vitkernels.* calls, which skip the Python checks): gather_rows masks out-of-range ids and checks
// that inverse_idx is idx's inverse (what makes its backward, a gather by inverse_idx, the adjoint); ids_restore
// must be a permutation of range(L) in every row (an O(N L) pass, small next to the O(N L D) copies).
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "vitkernels/masking_args.h"

namespace vitkernels {
namespace {

using masking_args::promoted;

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

// dst[0:D] = a (+ b), in scalar_t, with the add done in float (or double) as PyTorch's add does for half types.
template <typename scalar_t>
inline void write_row(scalar_t* dst, const scalar_t* a, const scalar_t* b, int64_t D) {
  if (b == nullptr) {
    std::memcpy(dst, a, sizeof(scalar_t) * D);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(a[d]) + static_cast<acc_t>(b[d]));
}

// Every row of ids (N, L), int64 and contiguous, is a permutation of range(L).
void check_permutation_rows(const char* op, const char* name, const at::Tensor& ids) {
  const int64_t N = ids.size(0), L = ids.size(1);
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
    std::vector<char> seen(L);
    for (int64_t n = begin; n < end && bad_row.load(std::memory_order_relaxed) < 0; ++n) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t rank = ip[n * L + l];
        if (rank < 0 || rank >= L || seen[rank]) {
          bad_row.store(n);
          break;
        }
        seen[rank] = 1;
      }
    }
  });
  const int64_t bad = bad_row.load();
  TORCH_CHECK(bad < 0, op, ": ", name, " must be a permutation of range(", L, ") in every row; row ", bad, " is not");
}

// idx (K,) or (N, K) and inverse (S,) or (N, S) (int64, contiguous, batch-shared alike) are each other's inverse
// where in range: 0 <= idx[k] < S implies inverse[idx[k]] == k, and 0 <= inverse[s] < K implies idx[inverse[s]] == s.
// Out-of-range entries select nothing (a zero row). This is what makes a gather's backward (the gather by inverse)
// its adjoint; it also means idx selects each source row at most once.
void check_inverse_pair(const char* op, const at::Tensor& idx, const at::Tensor& inverse) {
  const int64_t rows = idx.dim() == 2 ? idx.size(0) : 1, K = idx.size(-1), S = inverse.size(-1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int64_t* vp = inverse.const_data_ptr<int64_t>();
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(K + S, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end && bad_row.load(std::memory_order_relaxed) < 0; ++n) {
      const int64_t* i = ip + n * K;
      const int64_t* v = vp + n * S;
      bool ok = true;
      for (int64_t k = 0; k < K && ok; ++k) ok = i[k] < 0 || i[k] >= S || v[i[k]] == k;
      for (int64_t s = 0; s < S && ok; ++s) ok = v[s] < 0 || v[s] >= K || i[v[s]] == s;
      if (!ok) bad_row.store(n);
    }
  });
  const int64_t bad = bad_row.load();
  TORCH_CHECK(bad < 0, op, ": inverse_idx must be the inverse of idx (idx[inverse_idx[s]] == s wherever inverse_idx[s] "
              "is in [0, K), inverse_idx[idx[k]] == k wherever idx[k] is in [0, S)); row ", bad, " is not");
}

}  // namespace

at::Tensor gather_rows_cpu(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& inverse_idx,
                           const std::optional<at::Tensor>& add, std::optional<at::ScalarType> out_dtype) {
  const auto dtype = masking_args::check_gather_rows(src, idx, inverse_idx, add, out_dtype);
  const int64_t N = src.size(0), S = src.size(1), D = src.size(2), K = idx.size(-1);
  const bool shared = idx.dim() == 1;
  const at::Tensor ix = idx.to(at::kLong).contiguous();
  check_inverse_pair("gather_rows", ix, inverse_idx.to(at::kLong).contiguous());
  at::Tensor out = at::empty({N, K, D}, src.options().dtype(dtype));
  if (out.numel() == 0) return out;
  // Inputs in the output dtype (a no-op unless autocast mixed them): the loop then copies or adds rows.
  const at::Tensor s = src.to(dtype).contiguous();
  std::optional<at::Tensor> a;
  if (add.has_value()) a = add->to(dtype).contiguous();
  const int64_t add_stride = a.has_value() && a->size(0) != 1 ? S * D : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_gather_rows", [&] {
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.has_value() ? a->const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = ix.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * K, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / K, k = row % K;
        const int64_t j = ip[shared ? k : row];
        scalar_t* dst = op + row * D;
        if (j < 0 || j >= S) {
          std::memset(dst, 0, sizeof(scalar_t) * D);
          continue;
        }
        write_row(dst, sp + (n * S + j) * D, ap ? ap + n * add_stride + j * D : nullptr, D);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(
    const at::Tensor& x, const at::Tensor& noise, int64_t len_keep, const std::optional<at::Tensor>& pos_embed) {
  masking_args::check_random_masking(x, noise, len_keep, pos_embed);
  const int64_t N = x.size(0), L = x.size(1);
  // A stable ascending sort, as the reference: equal noise keeps patch order, NaN sorts last.
  const at::Tensor ids_shuffle = std::get<1>(at::sort(noise, /*stable=*/true, /*dim=*/1, /*descending=*/false))
                                     .contiguous();
  at::Tensor ids_restore = at::empty({N, L}, noise.options().dtype(at::kLong));
  const auto dtype = promoted(x, pos_embed);
  at::Tensor mask = at::empty({N, L}, x.options().dtype(dtype));
  const int64_t* shuffle = ids_shuffle.const_data_ptr<int64_t>();
  int64_t* restore = ids_restore.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_masking_mask", [&] {
    scalar_t* m = mask.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t rank = 0; rank < L; ++rank) {
          const int64_t patch = shuffle[n * L + rank];
          restore[n * L + patch] = rank;
          m[n * L + patch] = static_cast<scalar_t>(rank >= len_keep ? 1.0f : 0.0f);  // 1 = removed
        }
      }
    });
  });
  at::Tensor ids_keep = ids_shuffle.narrow(1, 0, len_keep).contiguous();
  at::Tensor x_masked = gather_rows_cpu(x, ids_keep, ids_restore, pos_embed, dtype);
  return {x_masked, mask, ids_restore, ids_keep};
}

at::Tensor mae_unshuffle_cpu(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                             const std::optional<at::Tensor>& pos_embed) {
  const auto dtype = masking_args::check_mae_unshuffle(x, ids_restore, mask_token, pos_embed);
  const int64_t N = x.size(0), keep = x.size(1) - 1, D = x.size(2), L = ids_restore.size(1);
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  check_permutation_rows("mae_unshuffle", "ids_restore", ids);
  at::Tensor out = at::empty({N, L + 1, D}, x.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor xs = x.to(dtype).contiguous();
  const at::Tensor token = mask_token.to(dtype).reshape({D}).contiguous();
  std::optional<at::Tensor> pos;
  if (pos_embed.has_value()) pos = pos_embed->to(dtype).contiguous();
  const int64_t pos_stride = pos.has_value() && pos->size(0) != 1 ? (L + 1) * D : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "vitkernels_mae_unshuffle", [&] {
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    const scalar_t* tp = token.const_data_ptr<scalar_t>();
    const scalar_t* pp = pos.has_value() ? pos->const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = ids.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * (L + 1), row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / (L + 1), t = row % (L + 1);
        const scalar_t* src;
        if (t == 0) {
          src = xp + n * (keep + 1) * D;  // CLS stays in front
        } else {
          const int64_t rank = ip[n * L + t - 1];
          src = rank < keep ? xp + (n * (keep + 1) + 1 + rank) * D : tp;
        }
        write_row(op + row * D, src, pp ? pp + n * pos_stride + t * D : nullptr, D);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mae_unshuffle_backward_cpu(const at::Tensor& grad, const at::Tensor& ids_restore,
                                                              int64_t keep, at::ScalarType x_dtype,
                                                              at::ScalarType token_dtype) {
  masking_args::check_mae_unshuffle_backward(grad, ids_restore, keep, x_dtype, token_dtype);
  const int64_t N = grad.size(0), L = ids_restore.size(1), D = grad.size(2);
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  // A permutation writes every visible token's row exactly once (grad_x is not zero-filled).
  check_permutation_rows("mae_unshuffle_backward", "ids_restore", ids);
  at::Tensor grad_x = at::empty({N, keep + 1, D}, grad.options());
  // The mask token's gradient: a sum over every masked position; per-sample partial sums in the accumulation type.
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::zeros({N, D}, grad.options().dtype(acc_type));
  if (N == 0 || D == 0) return {grad_x.to(x_dtype), partial.sum(0).to(token_dtype)};
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "vitkernels_unshuffle_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t* ip = ids.const_data_ptr<int64_t>();
    scalar_t* xp = grad_x.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        std::memcpy(xp + n * (keep + 1) * D, gp + n * (L + 1) * D, sizeof(scalar_t) * D);  // CLS
        acc_t* acc = pp + n * D;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t rank = ip[n * L + l];
          const scalar_t* src = gp + (n * (L + 1) + 1 + l) * D;
          if (rank < keep) {
            std::memcpy(xp + (n * (keep + 1) + 1 + rank) * D, src, sizeof(scalar_t) * D);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]);
          }
        }
      }
    });
  });
  return {grad_x.to(x_dtype), partial.sum(0).to(token_dtype)};
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("random_masking", &random_masking_cpu);
  m.impl("mae_unshuffle", &mae_unshuffle_cpu);
  m.impl("mae_unshuffle_backward", &mae_unshuffle_backward_cpu);
}

}  // namespace vitkernels
