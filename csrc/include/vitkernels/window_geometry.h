// Index math for Swin's shifted windows, shared by the CPU (.cpp) and CUDA (.cu / .cuh) kernels.
//
// Conventions (timm SwinTransformerBlock._attn): the image is (B, H, W, C) in NHWC order. The block rolls it by
// (-shift_h, -shift_w), pads the bottom/right to (Hp, Wp) = multiples of the window, and partitions into windows
// of wh x ww tokens, window-major then row-major inside a window:
//   window w = (b * nWh + wy) * nWw + wx,  token t = iy * ww + ix,
//   shifted-padded coordinate (r, s) = (wy * wh + iy, wx * ww + ix).
// A padded position (r >= H or s >= W) has no source token. A real one reads the original token
//   (y, x) = ((r + shift_h) mod H, (s + shift_w) mod W),
// and the inverse maps an original (y, x) to (r, s) = ((y - shift_h) mod H, (x - shift_w) mod W).
// The shift can exceed the image (shift < window, and a window may be larger than the image: timm with
// always_partition=True): the roll is by shift mod H, as torch.roll does, precomputed as roll_h, roll_w.
// The mask regions use the shift itself, on the padded image (timm's slices of the (Hp, Wp) mask image).
//
// Needs only a C++ compiler (or nvcc): no torch and no CUDA runtime headers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VK_HOST_DEVICE inline
#endif

namespace vitkernels {

struct WindowGeometry {
  int64_t B, H, W;             // image
  int64_t wh, ww;              // window
  int64_t shift_h, shift_w;    // cyclic shift, 0 <= shift < window (may be >= H or W)
  int64_t roll_h, roll_w;      // the roll it makes: shift mod H, shift mod W, in [0, H) x [0, W)
  int64_t Hp, Wp;              // padded image: multiples of the window
  int64_t nWh, nWw;            // windows per column / row

  VK_HOST_DEVICE static WindowGeometry make(int64_t B, int64_t H, int64_t W, int64_t wh, int64_t ww,
                                            int64_t shift_h, int64_t shift_w) {
    WindowGeometry g;
    g.B = B; g.H = H; g.W = W; g.wh = wh; g.ww = ww; g.shift_h = shift_h; g.shift_w = shift_w;
    g.roll_h = H > 0 ? shift_h % H : 0;
    g.roll_w = W > 0 ? shift_w % W : 0;
    g.nWh = H / wh + (H % wh != 0);  // ceil without forming H + wh - 1 (no overflow for huge windows)
    g.nWw = W / ww + (W % ww != 0);
    g.Hp = g.nWh * wh;
    g.Wp = g.nWw * ww;
    return g;
  }

  VK_HOST_DEVICE int64_t tokens_per_window() const { return wh * ww; }
  VK_HOST_DEVICE int64_t windows_per_image() const { return nWh * nWw; }
  VK_HOST_DEVICE int64_t num_window_rows() const { return B * nWh * nWw * wh * ww; }  // = B * Hp * Wp

  // Index into the ((2wh-1)(2ww-1), nH) relative position bias table of the pair (query i, key j) of a window.
  VK_HOST_DEVICE int64_t relative_index(int64_t i, int64_t j) const {
    return (i / ww - j / ww + wh - 1) * (2 * ww - 1) + (i % ww - j % ww + ww - 1);
  }

  // Token t of window w: its image b and padded, shifted coordinate (r, s).
  VK_HOST_DEVICE void window_coords(int64_t w, int64_t t, int64_t* b, int64_t* r, int64_t* s) const {
    *b = w / (nWw * nWh);
    *r = ((w / nWw) % nWh) * wh + t / ww;
    *s = (w % nWw) * ww + t % ww;
  }

  // The original token at the padded, shifted coordinate (r, s) of image b: flat b*H*W + y*W + x, -1 for padding.
  VK_HOST_DEVICE int64_t token_at(int64_t b, int64_t r, int64_t s) const {
    if (r >= H || s >= W) return -1;
    int64_t y = r + roll_h; if (y >= H) y -= H;  // r, roll_h < H: one subtraction is the modulo
    int64_t x = s + roll_w; if (x >= W) x -= W;
    return (b * H + y) * W + x;
  }

  // Row `row` of the (B * nW * N) partitioned rows -> flat source token b*H*W + y*W + x, or -1 for padding.
  VK_HOST_DEVICE int64_t source_token(int64_t row) const {
    const int64_t N = wh * ww;
    int64_t b, r, s;
    window_coords(row / N, row % N, &b, &r, &s);
    return token_at(b, r, s);
  }

  // Region id (0..8) of the padded, shifted coordinate (r, s) for the shifted-window mask: tokens of one window
  // attend to each other with -100 added when their ids differ (timm's slices; an axis without shift is one region).
  VK_HOST_DEVICE int region(int64_t r, int64_t s) const {
    int id = 0;
    if (shift_h > 0) id += 3 * (r < Hp - wh ? 0 : (r < Hp - shift_h ? 1 : 2));
    if (shift_w > 0) id += (s < Wp - ww ? 0 : (s < Wp - shift_w ? 1 : 2));
    return id;
  }

  // Token t of window w: its source token (as source_token, -1 for padding) and its mask region.
  VK_HOST_DEVICE int64_t window_token(int64_t w, int64_t t, int* region_id) const {
    int64_t b, r, s;
    window_coords(w, t, &b, &r, &s);
    *region_id = region(r, s);
    return token_at(b, r, s);
  }

  // Flat original token b*H*W + y*W + x -> its row among the partitioned rows.
  VK_HOST_DEVICE int64_t window_row(int64_t token) const {
    const int64_t x = token % W;
    const int64_t y = (token / W) % H;
    const int64_t b = token / (W * H);
    int64_t r = y - roll_h; if (r < 0) r += H;
    int64_t s = x - roll_w; if (s < 0) s += W;
    const int64_t w = (b * nWh + r / wh) * nWw + s / ww;
    return w * (wh * ww) + (r % wh) * ww + (s % ww);
  }
};

}  // namespace vitkernels
