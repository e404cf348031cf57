// ViT / DeiT patch embedding on CPU: patchify + GEMM + bias + position embedding + prefix-token concat, writing the
// final (B, P + L, D) token tensor once (semantics: vitkernels/reference/patch_embed.py).
//
// Forward: the image is gathered into patch rows A (B*L, K), K = C*ph*pw in the Conv2d weight's (c, py, px) order
// (zero for padded pixels, so dynamic_img_pad needs no padded copy), then for every image one GEMM
//   out[b, P:] = E + A_b @ W^T,   E = bias + pos_embed[patch rows]  (an (L, D) epilogue computed once),
// through addmm (beta = 1: the epilogue is the GEMM's C input, not another pass over the output). Prefix rows are
// prefix (+ pos_embed[:P] unless no_embed_class), copied to every image.
// Backward: grad_weight = sum_b G_b^T A_b (A rebuilt from the image), grad_x = col2im(G @ W) (patches do not
// overlap, so col2im is a scatter). The bias / pos_embed / prefix gradients are batch sums done in Python.
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

namespace vitkernels {
namespace {

struct PatchGrid {
  int64_t B, C, H, W, D, ph, pw, gh, gw;
  int64_t L() const { return gh * gw; }
  int64_t K() const { return C * ph * pw; }
};

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

// The patch grid of x (B, C, H, W) under weight (D, C, ph, pw), or a clear error naming the argument.
PatchGrid grid_of(const char* op, const at::Tensor& x, const at::Tensor& weight, bool dynamic_img_pad) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be (D, C, ph, pw), got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ", x.scalar_type());
  check_like(op, "weight", weight, x);
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight has ", weight.size(1), " input channels, x has ", x.size(1));
  PatchGrid g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3), 0, 0};
  TORCH_CHECK(g.ph > 0 && g.pw > 0, op, ": weight has an empty patch size (", g.ph, ", ", g.pw, ")");
  if (dynamic_img_pad) {
    g.gh = g.H / g.ph + (g.H % g.ph != 0);  // ceil without forming H + ph - 1
    g.gw = g.W / g.pw + (g.W % g.pw != 0);
  } else {
    TORCH_CHECK(g.H % g.ph == 0 && g.W % g.pw == 0, op, ": image size (", g.H, ", ", g.W,
                ") is not a multiple of the patch size (", g.ph, ", ", g.pw, ")");
    g.gh = g.H / g.ph;
    g.gw = g.W / g.pw;
  }
  return g;
}

// Patch rows of every image: A[b*L + l, (c*ph + py)*pw + px] = x[b, c, gy*ph + py, gx*pw + px] (0 outside the image).
template <typename scalar_t>
void im2col(const at::Tensor& x, at::Tensor& A, const PatchGrid& g) {
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = A.mutable_data_ptr<scalar_t>();
  const int64_t L = g.L(), K = g.K();
  at::parallel_for(0, g.B * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, l = row % L, y0 = (l / g.gw) * g.ph, x0 = (l % g.gw) * g.pw;
      const int64_t cols = std::min(g.pw, g.W - x0);  // pixels of the patch row inside the image
      scalar_t* out = dst + row * K;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t py = 0; py < g.ph; ++py) {
          scalar_t* seg = out + (c * g.ph + py) * g.pw;
          const int64_t y = y0 + py;
          if (y >= g.H || cols <= 0) {
            std::memset(seg, 0, sizeof(scalar_t) * g.pw);
            continue;
          }
          std::memcpy(seg, src + ((b * g.C + c) * g.H + y) * g.W + x0, sizeof(scalar_t) * cols);
          if (cols < g.pw) std::memset(seg + cols, 0, sizeof(scalar_t) * (g.pw - cols));
        }
      }
    }
  });
}

// The inverse scatter: grad_x[b, c, y, x] = dA[row of (y, x), column of (c, y, x)]; padded pixels are dropped.
template <typename scalar_t>
void col2im(const at::Tensor& dA, at::Tensor& grad_x, const PatchGrid& g) {
  const scalar_t* src = dA.const_data_ptr<scalar_t>();
  scalar_t* dst = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t L = g.L(), K = g.K();
  at::parallel_for(0, g.B * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, l = row % L, y0 = (l / g.gw) * g.ph, x0 = (l % g.gw) * g.pw;
      const int64_t cols = std::min(g.pw, g.W - x0);
      if (cols <= 0) continue;
      const scalar_t* in = src + row * K;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t py = 0; py < g.ph && y0 + py < g.H; ++py) {
          std::memcpy(dst + ((b * g.C + c) * g.H + y0 + py) * g.W + x0, in + (c * g.ph + py) * g.pw,
                      sizeof(scalar_t) * cols);
        }
      }
    }
  });
}

at::Tensor patch_rows(const at::Tensor& x, const PatchGrid& g) {
  at::Tensor A = at::empty({g.B * g.L(), g.K()}, x.options());
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vitkernels_im2col",
                                  [&] { im2col<scalar_t>(xc, A, g); });
  return A;
}

}  // namespace

at::Tensor patch_embed_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& prefix,
                           bool no_embed_class, bool dynamic_img_pad) {
  const char* op = "patch_embed";
  const PatchGrid g = grid_of(op, x, weight, dynamic_img_pad);
  const int64_t L = g.L();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.D, op, ": bias must be (", g.D, "), got ", bias->sizes());
    check_like(op, "bias", *bias, x);
  }
  if (prefix.has_value()) {
    TORCH_CHECK(prefix->dim() == 2 && prefix->size(1) == g.D, op, ": prefix_tokens must be (P, ", g.D, "), got ",
                prefix->sizes());
    check_like(op, "prefix_tokens", *prefix, x);
  }
  const int64_t P = prefix.has_value() ? prefix->size(0) : 0;
  if (pos.has_value()) {
    const int64_t rows = no_embed_class ? L : P + L;
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == rows && pos->size(1) == g.D, op, ": pos_embed must be (", rows,
                ", ", g.D, ") for ", P, " prefix and ", L, " patch tokens (no_embed_class=", no_embed_class, "), got ",
                pos->sizes());
    check_like(op, "pos_embed", *pos, x);
  }
  at::Tensor out = at::empty({g.B, P + L, g.D}, x.options());
  const at::Tensor A = patch_rows(x, g);
  const at::Tensor Wt = weight.reshape({g.D, g.K()}).t();  // (K, D) view

  // Epilogue E (L, D) = bias + position embedding of the patch rows, the GEMM's accumulator input.
  std::optional<at::Tensor> epilogue;
  if (pos.has_value()) {
    epilogue = pos->narrow(0, no_embed_class ? 0 : P, L);
    if (bias.has_value()) epilogue = *epilogue + *bias;
  } else if (bias.has_value()) {
    epilogue = bias->unsqueeze(0).expand({L, g.D});
  }
  for (int64_t b = 0; b < g.B; ++b) {
    at::Tensor dst = out[b].narrow(0, P, L);  // contiguous (L, D)
    const at::Tensor rows = A.narrow(0, b * L, L);
    if (epilogue.has_value()) {
      at::addmm_out(dst, *epilogue, rows, Wt);
    } else {
      at::mm_out(dst, rows, Wt);
    }
  }
  if (P > 0) {
    at::Tensor head = prefix->contiguous();
    if (pos.has_value() && !no_embed_class) head = head + pos->narrow(0, 0, P);
    out.narrow(1, 0, P).copy_(head.unsqueeze(0).expand({g.B, P, g.D}));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> patch_embed_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& weight, int64_t num_prefix,
                                                            bool dynamic_img_pad, bool need_input, bool need_weight) {
  const char* op = "patch_embed_backward";
  const PatchGrid g = grid_of(op, x, weight, dynamic_img_pad);
  const int64_t L = g.L();
  TORCH_CHECK(num_prefix >= 0 && grad.dim() == 3 && num_prefix <= grad.size(1), op, ": num_prefix must be in [0, ",
              "grad.size(1)], got ", num_prefix, " for grad ", grad.sizes());
  TORCH_CHECK(grad.size(0) == g.B && grad.size(1) == num_prefix + L && grad.size(2) == g.D, op,
              ": grad must be (B, P + L, D) = (", g.B, ", ", num_prefix + L, ", ", g.D, "), got ", grad.sizes());
  check_like(op, "grad", grad, x);
  const at::Tensor G = grad.narrow(1, num_prefix, L);  // (B, L, D), rows contiguous per image
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, weight.options());
  if (need_weight) {
    const at::Tensor A = patch_rows(x, g);
    // Accumulate over images in fp32 for half inputs, in the input's own precision otherwise.
    const auto acc_type = at::isReducedFloatingType(x.scalar_type()) ? at::kFloat : x.scalar_type();
    at::Tensor acc = at::zeros({g.D, g.K()}, weight.options().dtype(acc_type));
    for (int64_t b = 0; b < g.B; ++b) {
      acc.addmm_(G[b].t().to(acc_type), A.narrow(0, b * L, L).to(acc_type));
    }
    grad_w = acc.to(weight.scalar_type()).reshape(weight.sizes());
  }
  if (need_input) {
    const at::Tensor dA = at::matmul(G, weight.reshape({g.D, g.K()})).reshape({g.B * L, g.K()}).contiguous();
    grad_x = at::empty(x.sizes(), x.options());  // every pixel lies in exactly one patch: col2im writes all
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vitkernels_col2im",
                                    [&] { col2im<scalar_t>(dA, grad_x, g); });
  }
  return {grad_x, grad_w};
}

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("patch_embed", &patch_embed_cpu);
  m.impl("patch_embed_backward", &patch_embed_backward_cpu);
}

}  // namespace vitkernels
