// Body of the CPU Swin window attention (csrc/cpu/window_attention.cpp; with a 3D geometry also
// csrc/cpu/window_attention_3d.cpp): the forward and backward of one (window, head) work item, compiled once per
// instruction set by cpu_isa_each.h (with cpu_simd.h's vectors, exp and register-tiled GEMM in scope). The window
// addressing is the args' geometry type G (WindowGeometry or WindowGeometry3D). Deliberately no include guard.
// Needs window_attention_cpu.h.
//
// Math, per window w and head h (N tokens, padded tokens read `pad_row`, the qkv Linear's bias or zeros; with
// bias_every_token, every token's q, k, v are its qkv row plus pad_row):
//   S = (scale q) k^T + table[rel(i, j), h] + mask(i, j),  P = softmax_j(S),  O = P v,  lse_i = log sum_j exp S_ij
// backward, recomputing P = exp(S - lse) (delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id):
//   dV = P^T dO,  dP = dO v^T,  dS = P * (dP - delta),  dQ = scale dS k,  dK = dS^T (scale q),  d_bias += dS.
// or, when the forward saved P itself (training on CPU: args.probs), reading it back: one of the backward's five
// small GEMMs (S = q k^T, the widest, over the padded key columns) and the exp pass fewer, for the memory timm's
// attention keeps anyway (its softmax output, saved for its own backward).
//
// Everything is fp32 for fp32 / bf16 / fp16 storage (double for double). A work item reads its head's slices of
// the window's qkv rows straight from the image by index math (window_tokens + gather_rows / gather_columns: the
// pieces a Swin V2 kernel reuses), into per-thread scratch whose row strides are whole 64-byte vectors, zero-padded,
// so GEMM tiles never have a ragged column edge. The relative position bias initialises the S accumulators; only
// the windows that straddle shift regions add the mask.

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

// --- gathering a window by index math ------------------------------------------------------------------------------

// Window w's tokens: source[t] (flat b*H*W + y*W + x (3D: ((b*D + z)*H + y)*W + x), -1 for a padded position) and mask region[t] (as T, for
// vector compares). Returns whether the window straddles regions, i.e. needs the shifted-window mask.
// G: WindowGeometry, WindowGeometry3D, or any geometry with tokens_per_window() and window_token(w, t, &region).
template <typename G, typename T>
VK_INLINE bool window_tokens(const G& g, int64_t w, int64_t* source, T* region) {
  const int64_t N = g.tokens_per_window();
  bool mixed = false;
  int first = 0;
  for (int64_t t = 0; t < N; ++t) {
    int r;
    source[t] = g.window_token(w, t, &r);
    region[t] = static_cast<T>(r);
    if (t == 0) first = r;
    mixed |= r != first;
  }
  return mixed;
}

// dst[0:n] = scale * (src[0:n] + add[0:n]), computed in T.
template <typename S, typename T>
VK_INLINE void convert_added_scaled(T* dst, const S* src, const S* add, int64_t n, T scale) {
  int64_t d = 0;
  if constexpr (std::is_same<S, T>::value) {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::lanes;
    const V sc = splat(scale);
    for (; d + L <= n; d += L) store(dst + d, (load(src + d) + load(add + d)) * sc);
  }
  for (; d < n; ++d) dst[d] = (static_cast<T>(src[d]) + static_cast<T>(add[d])) * scale;
}

// Row t of dst (stride ldd) = scale * the `width` values at base + source[t] * stride, or at pad for a padded token;
// with `add` (not null), a real token's values are base[...] + add.
template <typename S, typename T>
VK_INLINE void gather_rows(const S* base, int64_t stride, const S* pad, const S* add, const int64_t* source,
                           int64_t n, int64_t width, T scale, T* dst, int64_t ldd) {
  for (int64_t t = 0; t < n; ++t) {
    if (source[t] < 0) {
      convert_scaled(dst + t * ldd, pad, width, scale);
    } else if (add != nullptr) {
      convert_added_scaled(dst + t * ldd, base + source[t] * stride, add, width, scale);
    } else {
      convert_scaled(dst + t * ldd, base + source[t] * stride, width, scale);
    }
  }
}

// The same values transposed: column t of dst (dst[d * ldd + t]). Whole L x L blocks (L tokens, L channels) are
// transposed in registers; the rest one value at a time.
template <typename S, typename T>
VK_INLINE void gather_columns(const S* base, int64_t stride, const S* pad, const S* add, const int64_t* source,
                              int64_t n, int64_t width, T* dst, int64_t ldd) {
  int64_t t0 = 0;
  if constexpr (std::is_same<S, T>::value) {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::lanes;
    if (width % L == 0) {
      for (; t0 + L <= n; t0 += L) {
        const T* src[L];
        for (int l = 0; l < L; ++l) src[l] = source[t0 + l] >= 0 ? base + source[t0 + l] * stride : pad;
        for (int64_t d0 = 0; d0 < width; d0 += L) {
          V r[L];
#pragma GCC unroll 16
          for (int l = 0; l < L; ++l) r[l] = load(src[l] + d0);
          if (add != nullptr) {
            const V extra = load(add + d0);
            for (int l = 0; l < L; ++l) {
              if (source[t0 + l] >= 0) r[l] += extra;
            }
          }
          transpose_in_registers<T>(r);
#pragma GCC unroll 16
          for (int l = 0; l < L; ++l) store(dst + (d0 + l) * ldd + t0, r[l]);
        }
      }
    }
  }
  for (int64_t t = t0; t < n; ++t) {
    if (source[t] < 0) {
      for (int64_t d = 0; d < width; ++d) dst[d * ldd + t] = static_cast<T>(pad[d]);
    } else {
      const S* src = base + source[t] * stride;
      for (int64_t d = 0; d < width; ++d) {
        dst[d * ldd + t] = add != nullptr ? static_cast<T>(src[d]) + static_cast<T>(add[d]) : static_cast<T>(src[d]);
      }
    }
  }
}

// base + source[t] * stride [0:width] = row_scale[t] * row t of src, for the real tokens.
template <typename S, typename T>
VK_INLINE void scatter_rows(S* base, int64_t stride, const int64_t* source, int64_t n, int64_t width, const T* src,
                            int64_t lds, const T* row_scale) {
  for (int64_t t = 0; t < n; ++t) {
    if (source[t] >= 0) convert_scaled(base + source[t] * stride, src + t * lds, width, row_scale[t]);
  }
}

// row[0:np] += kMaskValue where the key's region differs from the query's.
template <typename T>
VK_INLINE void add_mask(T* row, const T* region, T region_i, int64_t np) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const V ri = splat(region_i), masked = splat(static_cast<T>(kMaskValue)), zero = V{};
  for (int64_t j = 0; j < np; j += L) store(row + j, load(row + j) + (load(region + j) != ri ? masked : zero));
}

// --- one (window, head) work item ----------------------------------------------------------------------------------

// Scratch of one thread: the item's matrices (N or NP rows, strides NP for keys, HDP for channels), 64-byte aligned
// and zero-padded (the padding is never written, so it stays zero), and the tokens of the current window (kept while
// consecutive items share it) and of the next one (found early, to prefetch its rows).
template <typename T>
struct ItemScratch {
  T *q, *k, *kt, *v, *vt, *dout, *p, *dp, *o, *dk, *dv, *rowstat;
  T *region, *next_region;
  int64_t *source, *next_source;
  int64_t window = -1, next_window = -1;
  bool masked = false, next_masked = false;

  // Elements of T for N tokens of head_dim hd, plus the slack for aligning the base; and of int64_t for the tokens.
  static int64_t size(int64_t N, int64_t hd) {
    const int64_t NP = round_to_vector(N), HDP = round_to_vector(hd);
    return 6 * round_to_vector(N * HDP) + 2 * HDP * NP + 2 * round_to_vector(N * NP) + 5 * NP + 3 * HDP + kPad;
  }
  static int64_t token_size(int64_t N) { return 2 * N; }
  ItemScratch(T* base, int64_t N, int64_t hd, int64_t* tokens) : source(tokens), next_source(tokens + N) {
    const int64_t NP = round_to_vector(N), HDP = round_to_vector(hd);
    T* at = base + (kPad - reinterpret_cast<uintptr_t>(base) / sizeof(T) % kPad) % kPad;  // 64-byte aligned
    auto take = [&at](int64_t n) { T* p = at; at += round_to_vector(n); return p; };
    q = take(N * HDP); k = take(N * HDP); v = take(N * HDP); dout = take(N * HDP); o = take(N * HDP);
    dk = take(N * HDP); dv = v;  // v (forward) and dv (backward, where v is read transposed) never coexist
    kt = take(HDP * NP); vt = take(HDP * NP);
    p = take(N * NP); dp = take(N * NP);
    region = take(NP); next_region = take(NP);
    rowstat = take(3 * NP + 3 * HDP);  // 1 / sum; max or bias gradient sums; sum
  }

  // Window w's tokens, as the next window's (the current one's are not disturbed). Args: any args struct with the
  // geometry `g` and `shifted` (WindowAttentionArgs, or a Swin V2 kernel's own).
  template <typename Args>
  VK_INLINE const int64_t* tokens_of(const Args& a, int64_t w) {
    if (w == window) return source;
    if (w != next_window) {
      next_masked = window_tokens(a.g, w, next_source, next_region) && a.shifted;
      next_window = w;
    }
    return next_source;
  }

  template <typename Args>
  VK_INLINE void use_window(const Args& a, int64_t w) {
    if (w == window) return;
    tokens_of(a, w);
    std::swap(source, next_source);
    std::swap(region, next_region);
    std::swap(window, next_window);
    masked = next_masked;
  }
};

// What the middle of an item reads of the call (the args less the storage type S): the middle (its GEMMs, the
// softmax and dS passes, most of an item's code) is compiled once per compute type T and instruction set, not once
// per storage type as well; bf16 and fp16 storage run the float code. Compiled per storage type it was ~40% of the
// window-attention units' compile time, each built twice in CI (-O3, and -O0 under the sanitizers). The rows
// prefetched for the next item are addressed in bytes.
template <typename T>
struct ItemCall {
  int64_t N, nH, hd, C;
  bool bias_every_token;
  const T* bias_rows;
  T* lse;
  T* probs;
  TokenRows rows;  // the args' S arrays, for prefetching only
};

template <typename S, typename T, typename G>
ItemCall<T> item_call(const WindowAttentionArgs<S, T, G>& a) {
  return ItemCall<T>{a.N, a.nH, a.hd, a.C, a.bias_every_token, a.bias_rows, a.lse, a.probs,
                     token_rows(a.qkv, a.out, a.grad_out, a.grad_qkv)};
}

// Prefetch what the next item (w, h) reads of its token row t (head h's q, k, v slices; in the backward also its
// grad_out slice and its saved softmax row) and writes (its output slice, or its q, k, v gradient slices): the rows
// are scattered over the image, so the hardware prefetchers do not see them coming. The current item calls it for
// row t of the next item at its own row t (the forward's softmax loop, the backward's dS loop), so the ~400
// prefetches of an item are spread over the current item's work instead of issued at its start: issued at once,
// they stalled the core while the misses queued, and gained little (on a 2-core AMD Zen 2, qkv just written by its
// GEMM, A/B: the spread prefetch makes Swin-T's stage-1 attention at b4 1.43x faster forward and 1.21x backward,
// stage 2 1.33 / 1.16x, stage 3 1.18 / 1.12x, stage 4 1.05 / 1.04x, stage 1 at b1 (cache-resident) 1.10 / 1.12x;
// the same numbers). `next` is the next item's tokens (null: no next item).
template <typename T>
VK_INLINE void prefetch_row_of_next(const ItemCall<T>& a, const int64_t* next, int64_t w, int64_t h, int64_t t,
                                    bool backward) {
  if (next == nullptr) return;
  if (backward && a.probs != nullptr) {  // row t of the item's saved softmax (NP values)
    const int64_t NP = round_to_vector(a.N);
    prefetch_span(a.probs + ((w * a.nH + h) * a.N + t) * NP, NP * static_cast<int64_t>(sizeof(T)), false);
  }
  if (next[t] < 0) return;  // a padded token: read from pad_row, which stays cached
  prefetch_token_slices(a.rows, next[t], a.C, h * a.hd, a.hd, backward);
}

// The middle of item (w, h)'s forward, from its gathered scale q, k^T and v: S = bias + (scale q) k^T (-inf in the
// padding columns, from the bias rows), its softmax (saved as P, or as the log-sum-exp rows), and the unnormalised
// O = exp(S - max) v into s.o with 1 / sum in s.rowstat (the row scales the caller stores O with); prefetches for
// the next item (next: its tokens; null: none). Not inlined: one copy per compute type (ItemCall).
template <typename T>
VK_NOINLINE void forward_item_middle(const ItemCall<T>& a, int64_t w, int64_t h, ItemScratch<T>& s,
                                     const int64_t* next, int64_t next_w, int64_t next_h) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t N = a.N, hd = a.hd, NP = round_to_vector(N), HDP = round_to_vector(hd);
  gemm<T>(N, NP, hd, s.q, HDP, 1, s.kt, NP, s.p, NP, a.bias_rows + h * N * NP);
  // unnormalised softmax rows: exp(S - max); then, for all rows at once, 1 / sum (to scale O's rows) and the lse
  T* row_max = s.rowstat + NP;
  T* row_sum = s.rowstat + 2 * NP;
  for (int64_t i = 0; i < N; ++i) {
    prefetch_row_of_next(a, next, next_w, next_h, i, /*backward=*/false);
    T* row = s.p + i * NP;
    if (s.masked) add_mask(row, s.region, s.region[i], NP);
    V vmax = load(row);
    for (int64_t j = L; j < NP; j += L) { const V x = load(row + j); vmax = x > vmax ? x : vmax; }
    vmax = all_max<T>(vmax);
    V vsum = V{};
    for (int64_t j = 0; j < NP; j += L) {
      const V e = vexp(load(row + j) - vmax);  // 0 for the -inf padding columns
      store(row + j, e);
      vsum += e;
    }
    row_max[i] = vmax[0];
    row_sum[i] = hsum<T>(vsum);
  }
  for (int64_t i = N; i < NP; ++i) { row_max[i] = 0; row_sum[i] = 1; }
  for (int64_t i = 0; i < NP; i += L) {
    const V sum = load(row_sum + i);
    store(s.rowstat + i, T(1) / sum);
    store(row_max + i, load(row_max + i) + vlog(sum));
  }
  if (a.probs != nullptr) {
    // P = the exp rows times 1 / sum (rows of NP values, zeros past N), saved for the backward instead of the lse;
    // streamed to memory: it is read back only in the backward, and caching its lines would only evict the
    // forward's working set (and read each line before writing it)
    T* probs = a.probs + (w * a.nH + h) * N * NP;
    for (int64_t i = 0; i < N; ++i) {
      const V inv = splat(s.rowstat[i]);
      const T* row = s.p + i * NP;
      T* dst = probs + i * NP;
      for (int64_t j = 0; j < NP; j += L) store_streaming(dst + j, load(row + j) * inv);
    }
  } else {
    T* lse = a.lse + (w * a.nH + h) * N;
    for (int64_t i = 0; i < N; ++i) lse[i] = row_max[i];
  }
  gemm<T>(N, HDP, N, s.p, NP, 1, s.v, HDP, s.o, HDP);  // O = P v, unnormalised
}

// Forward of item (w, h): writes head h's output columns of the window's real tokens and its log-sum-exp rows;
// prefetches for the next item (next_w, next_h) (next_w < 0: none).
template <typename S, typename T, typename G>
void forward_item(const WindowAttentionArgs<S, T, G>& a, const ItemCall<T>& call, int64_t w, int64_t h,
                  ItemScratch<T>& s, int64_t next_w, int64_t next_h) {
  const int64_t N = a.N, hd = a.hd, C = a.C, NP = round_to_vector(N), HDP = round_to_vector(hd);
  const int64_t stride = 3 * C, off = h * hd;
  s.use_window(a, w);
  const S* pad = a.pad_row + off;
  const S* add = a.bias_every_token ? pad : nullptr;
  gather_rows(a.qkv + off, stride, pad, add, s.source, N, hd, static_cast<T>(a.scale), s.q, HDP);
  gather_columns(a.qkv + C + off, stride, pad + C, add ? add + C : nullptr, s.source, N, hd, s.kt, NP);
  gather_rows(a.qkv + 2 * C + off, stride, pad + 2 * C, add ? add + 2 * C : nullptr, s.source, N, hd, T(1), s.v, HDP);
  const int64_t* next = next_w >= 0 ? s.tokens_of(a, next_w) : nullptr;  // prefetched row by row, in the middle
  forward_item_middle(call, w, h, s, next, next_w, next_h);
  // O's rows scaled by 1 / sum as they are stored
  scatter_rows(a.out + off, C, s.source, N, hd, s.o, HDP, s.rowstat);
}

// The middle of item (w, h)'s backward, from its gathered scale q, k, k^T (without a saved P), v^T and dO: P (read
// where the forward saved it, else recomputed), dV into s.dv, dS into s.dp (added to this thread's d_bias), dQ /
// scale into s.o, dK into s.dk; what the padded tokens (and, with bias_every_token, all tokens) pass to the qkv
// bias added to d_qkv_bias (nH, 3, hd); prefetches for the next item. Not inlined: one copy per compute type.
template <typename T>
VK_NOINLINE void backward_item_middle(const ItemCall<T>& a, T scale, int64_t w, int64_t h, ItemScratch<T>& s,
                                      T* d_bias, double* d_qkv_bias, const int64_t* next, int64_t next_w,
                                      int64_t next_h) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t N = a.N, hd = a.hd, NP = round_to_vector(N), HDP = round_to_vector(hd);
  // P: as the forward saved it (rows of NP values, zeros past N), read where it is (the previous item prefetched
  // its rows; the copy into scratch it replaces cost 0-2% of the backward, A/B on a Zen 2); else recomputed
  const T* P = a.probs != nullptr ? a.probs + (w * a.nH + h) * N * NP : s.p;
  if (a.probs == nullptr) {
    // P = exp(S - lse)
    gemm<T>(N, NP, hd, s.q, HDP, 1, s.kt, NP, s.p, NP, a.bias_rows + h * N * NP);
    const T* lse = a.lse + (w * a.nH + h) * N;
    for (int64_t i = 0; i < N; ++i) {
      T* row = s.p + i * NP;
      if (s.masked) add_mask(row, s.region, s.region[i], NP);
      const V l = splat(lse[i]);
      for (int64_t j = 0; j < NP; j += L) store(row + j, vexp(load(row + j) - l));
    }
  }
  gemm<T>(N, HDP, N, P, 1, NP, s.dout, HDP, s.dv, HDP);  // dV = P^T dO
  gemm<T>(N, NP, hd, s.dout, HDP, 1, s.vt, NP, s.dp, NP);  // dP = dO v^T
  // dS = P * (dP - delta), into dp; d_bias += dS. delta_i = sum_j P_ij dP_ij, which equals dO_i . O_i (O = P v,
  // dP = dO v^T) without reading the forward's output back from memory.
  T* d_bias_h = d_bias + h * N * NP;
  for (int64_t i = 0; i < N; ++i) {
    prefetch_row_of_next(a, next, next_w, next_h, i, /*backward=*/true);
    softmax_backward_row(P + i * NP, s.dp + i * NP, d_bias_h + i * NP, NP);
  }
  gemm<T>(N, HDP, N, s.dp, NP, 1, s.k, HDP, s.o, HDP);   // dQ / scale = dS k
  gemm<T>(N, HDP, N, s.dp, 1, NP, s.q, HDP, s.dk, HDP);  // dK = dS^T (scale q)
  // What the qkv bias receives: the padded tokens' k, v gradients (their k, v are the bias; their q gets none:
  // dO = 0), and with the bias added to every token, every token's q, k, v gradients.
  bool any_to_bias = a.bias_every_token;
  for (int64_t t = 0; t < N && !any_to_bias; ++t) any_to_bias = s.source[t] < 0;
  if (any_to_bias) {
    // summed over the item's tokens in T, a vector of channels at a time over all tokens: the sums stay in
    // registers (accumulated into scratch token by token, each token's pass reloaded and stored them all: 6% of the
    // backward item on a Zen 3)
    T* bias_sum = s.rowstat + NP;  // 3 HDP values of scratch: q, k, v
    for (int64_t d = 0; d < HDP; d += L) {
      V sq = V{}, sk = V{}, sv = V{};
      for (int64_t t = 0; t < N; ++t) {
        const bool real = s.source[t] >= 0;
        if (real && !a.bias_every_token) continue;
        if (real) sq += load(s.o + t * HDP + d);
        sk += load(s.dk + t * HDP + d);
        sv += load(s.dv + t * HDP + d);
      }
      store(bias_sum + d, sq * splat(scale));
      store(bias_sum + HDP + d, sk);
      store(bias_sum + 2 * HDP + d, sv);
    }
    double* acc = d_qkv_bias + h * 3 * hd;
    for (int64_t part = 0; part < 3; ++part)
      for (int64_t d = 0; d < hd; ++d) acc[part * hd + d] += static_cast<double>(bias_sum[part * HDP + d]);
  }
}

// Backward of item (w, h): writes head h's q, k, v gradient columns of the window's real tokens; adds dS into this
// thread's d_bias (nH, N, NP) and what the qkv bias receives into its d_qkv_bias (nH, 3, hd); prefetches for the
// next item (next_w, next_h) (next_w < 0: none).
template <typename S, typename T, typename G>
void backward_item(const WindowAttentionArgs<S, T, G>& a, const ItemCall<T>& call, int64_t w, int64_t h,
                   ItemScratch<T>& s, T* d_bias, double* d_qkv_bias, int64_t next_w, int64_t next_h) {
  const int64_t N = a.N, hd = a.hd, C = a.C, NP = round_to_vector(N), HDP = round_to_vector(hd);
  const int64_t stride = 3 * C, off = h * hd;
  const T scale = static_cast<T>(a.scale);
  s.use_window(a, w);
  const S* pad = a.pad_row + off;
  const S* add = a.bias_every_token ? pad : nullptr;
  gather_rows(a.qkv + off, stride, pad, add, s.source, N, hd, scale, s.q, HDP);
  gather_rows(a.qkv + C + off, stride, pad + C, add ? add + C : nullptr, s.source, N, hd, T(1), s.k, HDP);
  if (a.probs == nullptr) {  // k^T: only for recomputing S
    gather_columns(a.qkv + C + off, stride, pad + C, add ? add + C : nullptr, s.source, N, hd, s.kt, NP);
  }
  gather_columns(a.qkv + 2 * C + off, stride, pad + 2 * C, add ? add + 2 * C : nullptr, s.source, N, hd, s.vt, NP);
  // dO rows (a padded query was cropped from the output: dO = 0)
  for (int64_t t = 0; t < N; ++t) {
    T* dout = s.dout + t * HDP;
    if (s.source[t] >= 0) {
      convert_scaled(dout, a.grad_out + s.source[t] * C + off, hd, T(1));
    } else {
      for (int64_t d = 0; d < hd; ++d) dout[d] = 0;
    }
  }
  const int64_t* next = next_w >= 0 ? s.tokens_of(a, next_w) : nullptr;  // prefetched row by row, in the middle
  backward_item_middle(call, scale, w, h, s, d_bias, d_qkv_bias, next, next_w, next_h);
  // the q, k, v gradients of the real tokens into grad_qkv
  for (int64_t t = 0; t < N; ++t) {
    if (s.source[t] < 0) continue;
    S* g = a.grad_qkv + s.source[t] * stride + off;
    convert_scaled(g, s.o + t * HDP, hd, scale);
    convert_scaled(g + C, s.dk + t * HDP, hd, T(1));
    convert_scaled(g + 2 * C, s.dv + t * HDP, hd, T(1));
  }
}

// --- a thread's run of items -----------------------------------------------------------------------------------------
// Item i is (window i / nH, head i % nH): consecutive items share windows, whose tokens are found once. `scratch`
// holds ItemScratch<T>::size(N, hd) zeros, `tokens` ItemScratch<T>::token_size(N) integers.

template <typename S, typename T, typename G>
void forward_items(const WindowAttentionArgs<S, T, G>& a, int64_t begin, int64_t end, T* scratch, int64_t* tokens) {
  ItemScratch<T> s(scratch, a.N, a.hd, tokens);
  const ItemCall<T> call = item_call(a);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t next = i + 1;
    forward_item(a, call, i / a.nH, i % a.nH, s, next < end ? next / a.nH : -1, next % a.nH);
  }
  if (a.probs != nullptr) streaming_fence();
}

template <typename S, typename T, typename G>
void backward_items(const WindowAttentionArgs<S, T, G>& a, int64_t begin, int64_t end, T* scratch, int64_t* tokens,
                    T* d_bias, double* d_qkv_bias) {
  ItemScratch<T> s(scratch, a.N, a.hd, tokens);
  const ItemCall<T> call = item_call(a);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t next = i + 1;
    backward_item(a, call, i / a.nH, i % a.nH, s, d_bias, d_qkv_bias, next < end ? next / a.nH : -1, next % a.nH);
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
