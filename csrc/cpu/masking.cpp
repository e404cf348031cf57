// MAE / MSN token masking on CPU (semantics: vitkernels/reference/masking.py), the same four ops as the Triton
// backend so that vitkernels/ops/masking.py registers one set of fakes and autograd for both:
//   gather_rows            out[n, k] = src[n, idx[n, k]] (+ add[0 or n, idx[n, k]]), 0 where idx is out of range
//   random_masking         stable sort of the noise -> ids_restore, ids_keep, mask; kept tokens (+ pos) gathered
//   mae_unshuffle          decoder input: CLS, then visible token or mask token per position (+ decoder pos)
//   mae_unshuffle_backward the scatter back to the visible tokens and the mask token's gradient (a sum)
// Every output row is produced by one contiguous row copy/add, rows split across threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

namespace vitkernels {
namespace {

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

at::ScalarType promoted(const at::Tensor& a, const std::optional<at::Tensor>& b) {
  return b.has_value() ? at::promote_types(a.scalar_type(), b->scalar_type()) : a.scalar_type();
}

}  // namespace

at::Tensor gather_rows_cpu(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& inverse_idx,
                           const std::optional<at::Tensor>& add, std::optional<at::ScalarType> out_dtype) {
  (void)inverse_idx;  // used by the backward (a gather by the inverse index), not here
  TORCH_CHECK(src.dim() == 3, "gather_rows: src must be (N, S, D), got ", src.sizes());
  TORCH_CHECK(idx.dim() == 1 || idx.dim() == 2, "gather_rows: idx must be (K,) or (N, K), got ", idx.sizes());
  const int64_t N = src.size(0), S = src.size(1), D = src.size(2), K = idx.size(-1);
  const auto dtype = out_dtype.value_or(promoted(src, add));
  // Inputs in the output dtype (a no-op unless autocast mixed them): the loop then copies or adds rows.
  const at::Tensor s = src.to(dtype).contiguous();
  const at::Tensor ix = idx.to(at::kLong).contiguous();
  std::optional<at::Tensor> a;
  if (add.has_value()) a = add->to(dtype).contiguous();
  at::Tensor out = at::empty({N, K, D}, src.options().dtype(dtype));
  const bool shared = idx.dim() == 1;
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
  TORCH_CHECK(x.dim() == 3 && noise.dim() == 2 && noise.size(0) == x.size(0) && noise.size(1) == x.size(1),
              "random_masking: x must be (N, L, D) and noise (N, L), got ", x.sizes(), " and ", noise.sizes());
  const int64_t N = x.size(0), L = x.size(1);
  TORCH_CHECK(len_keep >= 0 && len_keep <= L, "random_masking: len_keep must be in [0, ", L, "], got ", len_keep);
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
  TORCH_CHECK(x.dim() == 3 && ids_restore.dim() == 2 && ids_restore.size(0) == x.size(0),
              "mae_unshuffle: x must be (N, 1 + keep, D) and ids_restore (N, L), got ", x.sizes(), " and ",
              ids_restore.sizes());
  const int64_t N = x.size(0), keep = x.size(1) - 1, D = x.size(2), L = ids_restore.size(1);
  auto dtype = at::promote_types(x.scalar_type(), mask_token.scalar_type());
  if (pos_embed.has_value()) dtype = at::promote_types(dtype, pos_embed->scalar_type());
  const at::Tensor xs = x.to(dtype).contiguous();
  const at::Tensor token = mask_token.to(dtype).reshape({D}).contiguous();
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  std::optional<at::Tensor> pos;
  if (pos_embed.has_value()) pos = pos_embed->to(dtype).contiguous();
  const int64_t pos_stride = pos.has_value() && pos->size(0) != 1 ? (L + 1) * D : 0;
  at::Tensor out = at::empty({N, L + 1, D}, x.options().dtype(dtype));
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
  TORCH_CHECK(grad.dim() == 3 && ids_restore.dim() == 2 && grad.size(1) == ids_restore.size(1) + 1,
              "mae_unshuffle_backward: grad must be (N, 1 + L, D) for ids_restore (N, L), got ", grad.sizes(),
              " and ", ids_restore.sizes());
  const int64_t N = grad.size(0), L = ids_restore.size(1), D = grad.size(2);
  const at::Tensor g = grad.contiguous();
  const at::Tensor ids = ids_restore.to(at::kLong).contiguous();
  at::Tensor grad_x = at::empty({N, keep + 1, D}, grad.options());
  // The mask token's gradient: a sum over every masked position; per-sample partial sums in the accumulation type.
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::zeros({N, D}, grad.options().dtype(acc_type));
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
