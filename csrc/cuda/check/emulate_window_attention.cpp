// C entry points over the CUDA window attention launchers, Swin V1 (window_attention.cuh), V2
// (window_attention_v2.cuh) and 3D (window_attention_3d.cuh), for the CPU emulation (emulate_cuda.py): compiled with
// g++ against the emulated runtime in emulate/, together with the explicit instantiations
// window_attention{,_v2,_3d}_{fwd,bwd}_kernels.cu, so the real launchers and kernel bodies run on the CPU. The caller
// mirrors the torch bindings (window_attention{,_v2,_3d}.cu): it allocates the same outputs and scratch and does the
// same host-side reductions. Never part of the extension.
#include <cstdint>

#include "window_attention.cuh"
#include "window_attention_3d.cuh"
#include "window_attention_v2.cuh"

namespace {

using vitkernels::WindowGeometry;
using namespace vitkernels::cuda;

// dims: B, H, W, wh, ww, shift_h, shift_w, num_heads, head_dim
WindowAttentionShape shape_of(const int64_t* d) {
  return make_window_attention_shape(WindowGeometry::make(d[0], d[1], d[2], d[3], d[4], d[5], d[6]), d[7], d[8]);
}

// dims: B, D, H, W, wd, wh, ww, sd, sh, sw, pad_before_shift, num_heads, head_dim
WindowAttentionShape3D shape3d_of(const int64_t* d) {
  return make_window_attention_3d_shape(
      vitkernels::WindowGeometry3D::make(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10] != 0),
      d[11], d[12]);
}

// dtype: 0 float, 1 double, 2 half, 3 bfloat16 (the binding's four).
template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(__half{});
    case 3: return f(__nv_bfloat16{});
    default: return -1;
  }
}

}  // namespace

extern "C" {

int vk_emu_window_attention_fwd(int dtype, const void* qkv, const void* pad_row, const void* table, void* out,
                                void* lse, const int64_t* dims, double scale) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    return static_cast<int>(launch_window_attention_fwd<T>(
        static_cast<const T*>(qkv), static_cast<const T*>(pad_row), static_cast<const A*>(table),
        static_cast<T*>(out), static_cast<A*>(lse), shape_of(dims), scale, nullptr));
  });
}

int vk_emu_window_attention_bwd(int dtype, const void* grad_out, const void* qkv, const void* pad_row,
                                const void* table, const void* out, const void* lse, void* delta, void* grad_qkv,
                                void* d_bias, void* d_pad, const int64_t* dims, double scale,
                                int64_t windows_per_group) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    return static_cast<int>(launch_window_attention_bwd<T>(
        static_cast<const T*>(grad_out), static_cast<const T*>(qkv), static_cast<const T*>(pad_row),
        static_cast<const A*>(table), static_cast<const T*>(out), static_cast<const A*>(lse), static_cast<A*>(delta),
        static_cast<T*>(grad_qkv), static_cast<A*>(d_bias), static_cast<A*>(d_pad), shape_of(dims), scale,
        windows_per_group, nullptr));
  });
}

int vk_emu_window_attention_bias_grad(const double* d_bias, double* grad_table, int64_t wh, int64_t ww, int64_t nH) {
  return static_cast<int>(launch_window_attention_bias_grad<double>(d_bias, grad_table, wh, ww, nH, nullptr));
}

int64_t vk_emu_window_attention_windows_per_group(int64_t windows, int64_t num_heads, int64_t target_blocks) {
  return window_attention_windows_per_group(windows, num_heads, target_blocks);
}

int64_t vk_emu_window_attention_pad_partials(const int64_t* dims, int64_t windows_per_group) {
  return window_attention_pad_partials(shape_of(dims), windows_per_group);
}

int64_t vk_emu_window_attention_chunks(const int64_t* dims) { return window_attention_blocks(shape_of(dims)).chunks; }

// Swin V2: scale is the (nH) tau in the compute type; d_scale (windows, nH, chunks).
int vk_emu_window_attention_v2_fwd(int dtype, const void* qkv, const void* pad_row, const void* table,
                                   const void* scale, void* out, void* lse, const int64_t* dims) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    return static_cast<int>(launch_window_attention_v2_fwd<T>(
        static_cast<const T*>(qkv), static_cast<const T*>(pad_row), static_cast<const A*>(table),
        static_cast<const A*>(scale), static_cast<T*>(out), static_cast<A*>(lse), shape_of(dims), nullptr));
  });
}

int vk_emu_window_attention_v2_bwd(int dtype, const void* grad_out, const void* qkv, const void* pad_row,
                                   const void* table, const void* scale, const void* out, const void* lse,
                                   void* delta, void* grad_qkv, void* d_scale, void* d_bias, void* d_pad,
                                   const int64_t* dims, int64_t windows_per_group) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    return static_cast<int>(launch_window_attention_v2_bwd<T>(
        static_cast<const T*>(grad_out), static_cast<const T*>(qkv), static_cast<const T*>(pad_row),
        static_cast<const A*>(table), static_cast<const A*>(scale), static_cast<const T*>(out),
        static_cast<const A*>(lse), static_cast<A*>(delta), static_cast<T*>(grad_qkv), static_cast<A*>(d_scale),
        static_cast<A*>(d_bias), static_cast<A*>(d_pad), shape_of(dims), windows_per_group, nullptr));
  });
}

// 3D (window_attention_3d.cuh): dims as shape3d_of.
int vk_emu_window_attention_3d_fwd(int dtype, const void* qkv, const void* pad_row, const void* table, void* out,
                                   void* lse, const int64_t* dims, double scale) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    return static_cast<int>(launch_window_attention_3d_fwd<T>(
        static_cast<const T*>(qkv), static_cast<const T*>(pad_row), static_cast<const A*>(table),
        static_cast<T*>(out), static_cast<A*>(lse), shape3d_of(dims), scale, nullptr));
  });
}

int vk_emu_window_attention_3d_bwd(int dtype, const void* grad_out, const void* qkv, const void* pad_row,
                                   const void* table, const void* out, const void* lse, void* delta, void* grad_qkv,
                                   void* d_bias, void* d_pad, const int64_t* dims, double scale,
                                   int64_t windows_per_group) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    return static_cast<int>(launch_window_attention_3d_bwd<T>(
        static_cast<const T*>(grad_out), static_cast<const T*>(qkv), static_cast<const T*>(pad_row),
        static_cast<const A*>(table), static_cast<const T*>(out), static_cast<const A*>(lse), static_cast<A*>(delta),
        static_cast<T*>(grad_qkv), static_cast<A*>(d_bias), static_cast<A*>(d_pad), shape3d_of(dims), scale,
        windows_per_group, nullptr));
  });
}

int vk_emu_window_attention_3d_bias_grad(const double* d_bias, double* grad_table, int64_t wd, int64_t wh,
                                         int64_t ww, int64_t nH) {
  return static_cast<int>(launch_window_attention_3d_bias_grad<double>(d_bias, grad_table, wd, wh, ww, nH, nullptr));
}

int64_t vk_emu_window_attention_3d_pad_partials(const int64_t* dims, int64_t windows_per_group) {
  return window_attention_pad_partials(shape3d_of(dims), windows_per_group);
}

}  // extern "C"
