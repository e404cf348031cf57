// Index math for 3D (volumetric / video) shifted windows: MONAI SwinUNETR and Video Swin, and, with
// pad_before_shift = false, timm's 2D order lifted to 3D (semantics: vitkernels/reference/window_attention_3d.py).
//
// The volume is (B, D, H, W, C), channels last. Per axis (length n, window w, shift s with 0 <= s < w, padded length
// P = ceil(n / w) * w), a coordinate p of the padded, shifted frame reads
//   pad before shift (MONAI, Video Swin: pad, then roll by -s):  src = (p + s) mod P, a real token if src < n;
//   pad after shift  (timm: roll by -s, then pad):               a real token if p < n, src = (p + s) mod n.
// The shift may exceed the axis when the window does (s < w, n < w): the roll is by s mod n then (as torch.roll), and
// with padding first by s < P, so one subtraction is the modulo. Windows are numbered depth-major,
//   window = ((b * nWd + iwd) * nWh + iwh) * nWw + iww,  token t = (td * wh + th) * ww + tw  (row-major in the window),
// and the mask region of a frame coordinate is per axis 0 if p < P - w, 1 if p < P - s, else 2 (0 on an axis
// without shift), 9 * rd + 3 * rh + rw over the three axes: 27 regions, from padded coordinates.
// The relative position index of tokens i, j is (di - dj + wd-1)(2wh-1)(2ww-1) + (hi - hj + wh-1)(2ww-1) + (wi - wj +
// ww-1), MONAI's / Video Swin's.
//
// Needs only a C++ compiler: no torch. All index math is int64; the sizes it forms are checked to fit int64 by the
// callers before make() (csrc/include/vitkernels/window_attention_3d_args.h).
#pragma once

#include <cstdint>

#include "vitkernels/window_geometry.h"  // VK_HOST_DEVICE

namespace vitkernels {

// One axis of the volume: length, window, shift and what follows from them.
struct WindowAxis {
  int64_t n;       // length (> 0)
  int64_t w;       // window (> 0)
  int64_t s;       // shift, 0 <= s < w (may be >= n)
  int64_t roll;    // the roll the pad-after-shift order makes along the unpadded axis: s mod n
  int64_t nW;      // windows along the axis
  int64_t P;       // padded length nW * w
  bool pad_first;  // pad before the shift

  VK_HOST_DEVICE static WindowAxis make(int64_t n, int64_t w, int64_t s, bool pad_first) {
    WindowAxis a;
    a.n = n; a.w = w; a.s = s; a.pad_first = pad_first;
    a.roll = n > 0 ? ((s % n) + n) % n : 0;
    a.nW = n / w + (n % w != 0);  // ceil without forming n + w - 1
    a.P = a.nW * w;
    return a;
  }

  // Source coordinate of frame coordinate p in [0, P), or -1 for a padded position.
  VK_HOST_DEVICE int64_t source(int64_t p) const {
    if (pad_first) {
      int64_t src = p + s;  // p < P, s < w <= P: one subtraction is the modulo
      if (src >= P) src -= P;
      return src < n ? src : -1;
    }
    if (p >= n) return -1;
    int64_t src = p + roll;  // p, roll < n
    if (src >= n) src -= n;
    return src;
  }

  // Mask region (0, 1, 2) of frame coordinate p; 0 everywhere without a shift.
  VK_HOST_DEVICE int region(int64_t p) const {
    if (s == 0) return 0;
    return p < P - w ? 0 : (p < P - s ? 1 : 2);
  }
};

struct WindowGeometry3D {
  int64_t B;
  WindowAxis d, h, w;

  VK_HOST_DEVICE static WindowGeometry3D make(int64_t B, int64_t D, int64_t H, int64_t W, int64_t wd, int64_t wh,
                                              int64_t ww, int64_t sd, int64_t sh, int64_t sw, bool pad_first) {
    WindowGeometry3D g;
    g.B = B;
    g.d = WindowAxis::make(D, wd, sd, pad_first);
    g.h = WindowAxis::make(H, wh, sh, pad_first);
    g.w = WindowAxis::make(W, ww, sw, pad_first);
    return g;
  }

  VK_HOST_DEVICE bool shifted() const { return d.s > 0 || h.s > 0 || w.s > 0; }
  VK_HOST_DEVICE int64_t tokens_per_window() const { return d.w * h.w * w.w; }
  VK_HOST_DEVICE int64_t windows_per_image() const { return d.nW * h.nW * w.nW; }

  // Index into the ((2wd-1)(2wh-1)(2ww-1), nH) relative position bias table of the pair (query i, key j).
  VK_HOST_DEVICE int64_t relative_index(int64_t i, int64_t j) const {
    const int64_t hw = h.w * w.w;
    const int64_t di = i / hw, hi = (i / w.w) % h.w, wi = i % w.w;
    const int64_t dj = j / hw, hj = (j / w.w) % h.w, wj = j % w.w;
    return ((di - dj + d.w - 1) * (2 * h.w - 1) + (hi - hj + h.w - 1)) * (2 * w.w - 1) + (wi - wj + w.w - 1);
  }

  // Token t of window win: its source token (flat ((b * D + z) * H + y) * W + x, -1 for a padded position) and its
  // mask region (0..26).
  VK_HOST_DEVICE int64_t window_token(int64_t win, int64_t t, int* region_id) const {
    const int64_t iww = win % w.nW, iwh = (win / w.nW) % h.nW, iwd = (win / (w.nW * h.nW)) % d.nW;
    const int64_t b = win / (w.nW * h.nW * d.nW);
    const int64_t pz = iwd * d.w + t / (h.w * w.w);
    const int64_t py = iwh * h.w + (t / w.w) % h.w;
    const int64_t px = iww * w.w + t % w.w;
    *region_id = 9 * d.region(pz) + 3 * h.region(py) + w.region(px);
    const int64_t z = d.source(pz), y = h.source(py), x = w.source(px);
    if (z < 0 || y < 0 || x < 0) return -1;
    return ((b * d.n + z) * h.n + y) * w.n + x;
  }
};

}  // namespace vitkernels
