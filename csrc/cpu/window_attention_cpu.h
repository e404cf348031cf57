// What the CPU window attention kernels (window_attention_kernel.h, compiled per instruction set) are given per
// call: the geometry, the pointers, the expanded relative position bias. No torch: a C++ harness can include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "vitkernels/window_geometry.h"

namespace vitkernels {
namespace cpu {

constexpr int64_t kPad = 16;         // scratch strides are multiples of 16 elements: whole 64-byte vectors
constexpr double kMaskValue = -100;  // timm / official Swin: added across regions of the shifted image

inline int64_t round_to_vector(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// Everything a (window, head) task needs; S is the storage type, T the compute type (float, or double for double),
// G the window addressing: WindowGeometry (2D Swin) or WindowGeometry3D (3D: window_attention_3d.cpp), anything with
// tokens_per_window(), window_token(w, t, &region) and relative_index(i, j).
template <typename S, typename T, typename G = WindowGeometry>
struct WindowAttentionArgs {
  G g;
  int64_t N, nH, hd, C;  // tokens per window, heads, head dim, nH * hd
  double scale;
  bool shifted;
  const S* qkv;          // (B, H, W, 3C) (3D: (B, D, H, W, 3C); likewise out, grad_out, grad_qkv)
  const S* pad_row;      // (3C): what a padded token's q, k, v are (the qkv Linear's bias, or zeros)
  bool bias_every_token; // qkv lacks the qkv Linear's bias: add pad_row to every real token too
  const T* bias_rows;    // (nH, N, NP): table[rel(i, j), h], -inf for the padding columns j >= N
  T* lse;                // (B * nW, nH, N); null when `probs` holds the softmax instead
  T* probs;              // (B * nW, nH, N, NP): the softmax P (rows padded with zeros to NP = round_to_vector(N)
                         // columns, 64-byte aligned), written by a forward that saves it for the backward, which
                         // then reads it instead of recomputing it from lse; null: not saved
  S* out;                // forward: (B, H, W, C)
  const S* grad_out;     // backward: (B, H, W, C)
  S* grad_qkv;           // backward: (B, H, W, 3C)
};

}  // namespace cpu
}  // namespace vitkernels
