// Body of the CPU Swin V2 window attention (csrc/cpu/window_attention_v2.cpp): the per-window forward and backward,
// compiled once per instruction set by cpu_isa_each.h (as V1's window_attention_kernel.h), with cpu_simd.h's vector
// type Vec<T>, load / store / splat, vexp, hmax / hsum and the register-tiled gemm in scope. Deliberately no include
// guard. Needs window_attention_cpu.h (kPad, kMaskValue, round_to_vector) and window_attention_v2.cpp's
// WindowAttentionV2Args.
//
// Math, per window w and head h (N tokens; padded tokens read `pad_row`, the qkv Linear's bias or zeros):
//   rq_i = |q_i|, q^_i = q_i / max(rq_i, eps)  (likewise k; eps = 1e-12, F.normalize)
//   S = tau_h q^ k^T + table[rel(i, j), h] + mask(i, j),  P = softmax_j(S),  O = P v,  lse_i = log sum_j exp S_ij
// backward, reading P as the forward saved it (save_probs: training) or recomputing P = exp(S - lse) (delta_i =
// sum_j P_ij dP_ij, which equals dO_i . O_i, in fp32 from P and dP rather than from the stored, rounded output:
// what V1 does):
//   dV = P^T dO,  dP = dO v^T,  dS = P * (dP - delta),  d_table[rel, h] += dS,
//   G = dS k^,  d tau_h += sum_i q^_i . G_i,  dq^ = tau G,  dk^ = tau dS^T q^,
//   dq_i = (dq^_i - q^_i (q^_i . dq^_i)) / rq_i  where rq_i >= eps, else dq^_i / eps  (F.normalize's backward);
//   likewise dk.
//
// fp32 math for fp32 / bf16 / fp16 storage (double for double). Matrices live in per-thread scratch whose row
// strides are multiples of 16 elements (whole 64-byte vectors), zero-padded, as V1's.

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

// Scratch of one thread: the window's qkv rows (and, in the backward, its output-gradient rows), then one head's
// matrices of N (or NP) rows with strides HDP (channels) or NP (keys), each 64-byte aligned and zero-padded.
template <typename T>
struct ScratchV2 {
  T *rows, *grad_rows, *qn, *kn, *knt, *v, *vt, *dout, *p, *dp, *o, *gk, *dv, *norm_q, *norm_k, *region;
  int64_t* source;

  static int64_t round(int64_t n) { return round_to_vector(n); }
  static int64_t size(int64_t N, int64_t nH, int64_t hd) {
    const int64_t NP = round(N), HDP = round(hd), C = nH * hd;
    return N * round(3 * C) + N * round(C) + 7 * round(N * HDP) + 2 * round(HDP * NP) + 2 * round(N * NP) +
           3 * NP + kPad;
  }
  ScratchV2(T* base, int64_t N, int64_t nH, int64_t hd, int64_t* source_rows) : source(source_rows) {
    const int64_t NP = round(N), HDP = round(hd), C = nH * hd;
    T* at = base + (kPad - reinterpret_cast<uintptr_t>(base) / sizeof(T) % kPad) % kPad;  // 64-byte aligned
    auto take = [&at](int64_t n) { T* p = at; at += round(n); return p; };
    rows = take(N * round(3 * C)); grad_rows = take(N * round(C));
    qn = take(N * HDP); kn = take(N * HDP); v = take(N * HDP); dout = take(N * HDP); o = take(N * HDP);
    gk = take(N * HDP); dv = take(N * HDP);
    knt = take(HDP * NP); vt = take(HDP * NP);
    p = take(N * NP); dp = take(N * NP);
    norm_q = take(NP); norm_k = take(NP); region = take(NP);
  }
};

// What a head's work reads of the call (the args less the storage type S): the per-head middle of the forward and
// backward (normalisation, GEMMs, softmax, dS) is compiled once per compute type T and instruction set, not once per
// storage type as well (V1's ItemCall); the rows prefetched for the next window are addressed in bytes.
template <typename T>
struct V2Call {
  int64_t N, nH, hd, C;
  bool shifted;
  const T* bias_rows;
  const T* scale;
  T* lse;
  T* probs;
  TokenRows rows;  // the args' S arrays, for prefetching only
};

template <typename S, typename T>
V2Call<T> v2_call(const WindowAttentionV2Args<S, T>& a) {
  return V2Call<T>{a.N, a.nH, a.hd, a.C, a.shifted, a.bias_rows, a.scale, a.lse, a.probs,
                   token_rows(a.qkv, a.out, a.grad_out, a.grad_qkv)};
}

// Window w: each token's source token (-1 for padding, WindowGeometry's addressing) and mask region, and its qkv
// rows (a padded token's are `pad_row`), gathered once for all heads.
template <typename S, typename T>
VK_INLINE void gather_window_v2(const WindowAttentionV2Args<S, T>& a, int64_t w, ScratchV2<T>& s) {
  const int64_t width = 3 * a.C, stride = s.round(width);
  for (int64_t t = 0; t < a.N; ++t) {
    int region;
    s.source[t] = a.g.window_token(w, t, &region);
    s.region[t] = static_cast<T>(region);
    const S* src = s.source[t] >= 0 ? a.qkv + s.source[t] * width : a.pad_row;
    T* dst = s.rows + t * stride;
    for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<T>(src[c]);
  }
}

// Window w's source tokens (-1 for padding) into next: the next window's, found ahead to prefetch its rows.
template <typename S, typename T>
VK_INLINE void window_sources_v2(const WindowAttentionV2Args<S, T>& a, int64_t w, int64_t* next) {
  for (int64_t t = 0; t < a.N; ++t) {
    int region;
    next[t] = a.g.window_token(w, t, &region);
  }
}

// Prefetch into L2 what the next window's token t holds for head h (its q, k, v slices; in the backward also its
// output-gradient slice) and what head h writes of it (its output slice, or its q, k, v gradient slices). The
// current window calls it at head h's row t, so the next window's rows (scattered over the image: the hardware
// prefetchers do not see them coming) arrive over the current window's work, its heads together covering whole
// rows: V1's prefetch_row_of_next, for a kernel that gathers whole rows once per window (A/B on a 2-core AMD Zen 2,
// Swin V2-T shapes: forward 1.04-1.09x at stage 1 b2 / b4 and stage 3 b8, 0.98-1.01x where qkv stays in cache (stage
// 1 b1, stage 3 b4); forward + backward 1.07-1.11x). `next` null: no next window.
template <typename T>
VK_INLINE void prefetch_row_of_next_window(const V2Call<T>& a, const int64_t* next, int64_t h, int64_t t,
                                           bool backward) {
  if (next == nullptr || next[t] < 0) return;  // a padded token reads pad_row, which stays cached
  prefetch_token_slices(a.rows, next[t], a.C, h * a.hd, a.hd, backward);
}

// sum_d x[d] y[d] over n values: whole vectors into one vector of partial sums (lane l sums d = l mod L), then the
// tail. The scalar loops it replaces kept C++'s left-to-right order, which the compiler cannot vectorise: ~13% of
// the forward went to the norms of q and k (Swin V2-T stage 1, b4, 2-core Zen 2; A/B with row_dot: forward
// 1.11-1.12x, forward + backward 1.06-1.11x at stage 1 b1 / b4 and stage 3 b4).
template <typename T>
VK_INLINE T row_dot(const T* x, const T* y, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc = V{};
  int64_t d = 0;
  for (; d + L <= n; d += L) acc += load(x + d) * load(y + d);
  T sum = hsum<T>(acc);
  for (; d < n; ++d) sum += x[d] * y[d];
  return sum;
}

// |x| of hd values; x / max(|x|, eps) into dst (F.normalize: a division, as torch does it). Returns |x|.
template <typename T>
VK_INLINE T normalize_row(const T* x, int64_t hd, T* dst) {
  const T norm = std::sqrt(row_dot(x, x, hd));
  const T denom = norm > static_cast<T>(kNormEps) ? norm : static_cast<T>(kNormEps);
  for (int64_t d = 0; d < hd; ++d) dst[d] = x[d] / denom;
  return norm;
}

// Head h's normalised q and k (rows; k also transposed), v as rows (v_rows) or transposed, and the norms |q_t|, |k_t|.
template <typename T>
VK_INLINE void load_head_v2(const V2Call<T>& a, int64_t h, ScratchV2<T>& s, bool v_rows) {
  const int64_t HDP = s.round(a.hd), NP = s.round(a.N), stride = s.round(3 * a.C), hd = a.hd;
  for (int64_t t = 0; t < a.N; ++t) {
    const T* row = s.rows + t * stride + h * hd;
    s.norm_q[t] = normalize_row(row, hd, s.qn + t * HDP);
    T* k = s.kn + t * HDP;
    s.norm_k[t] = normalize_row(row + a.C, hd, k);
    for (int64_t d = 0; d < hd; ++d) s.knt[d * NP + t] = k[d];
    const T* vrow = row + 2 * a.C;
    if (v_rows) {
      T* v = s.v + t * HDP;
      for (int64_t d = 0; d < hd; ++d) v[d] = vrow[d];
    } else {
      for (int64_t d = 0; d < hd; ++d) s.vt[d * NP + t] = vrow[d];
    }
  }
}

// Row i of S (NP entries; q^ k^T on entry) = tau * row + bias + mask; -inf past N (the bias rows carry it).
template <typename T>
VK_INLINE void scale_add_bias_and_mask(const V2Call<T>& a, int64_t h, int64_t i, T tau, T* row, const ScratchV2<T>& s) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t NP = s.round(a.N);
  const T* bias = a.bias_rows + (h * a.N + i) * NP;
  const V vtau = splat(tau);
  if (a.shifted) {
    const V region_i = splat(s.region[i]);
    const V masked = splat(static_cast<T>(kMaskValue)), zero = V{};
    for (int64_t j = 0; j < NP; j += L) {
      store(row + j, load(row + j) * vtau + load(bias + j) + (load(s.region + j) != region_i ? masked : zero));
    }
  } else {
    for (int64_t j = 0; j < NP; j += L) store(row + j, load(row + j) * vtau + load(bias + j));
  }
}

// dx of F.normalize for one row, in place over g: dx^ = tau * g; (dx^ - x^ (x^ . dx^)) / |x| where |x| >= eps,
// else dx^ / eps. Returns x^ . g (the row's share of d tau).
template <typename T>
VK_INLINE T normalize_backward_row(const T* x_hat, T* g, T norm, T tau, int64_t hd) {
  T* dx = g;
  const T dot = row_dot(x_hat, g, hd);
  if (norm >= static_cast<T>(kNormEps)) {
    const T inv = T(1) / norm;
    for (int64_t d = 0; d < hd; ++d) dx[d] = tau * (g[d] - x_hat[d] * dot) * inv;
  } else {
    const T inv = T(1) / static_cast<T>(kNormEps);
    for (int64_t d = 0; d < hd; ++d) dx[d] = tau * g[d] * inv;
  }
  return dot;
}

// Head h of window w's forward, from the window's gathered rows: q^, k^, v, S = tau q^ k^T + bias + mask, its
// softmax (saved as P, or as the log-sum-exp rows) and O = P v into s.o; prefetches what the next window's tokens
// (next; null: none) hold for head h. Not inlined: one copy per compute type (V2Call).
template <typename T>
VK_NOINLINE void forward_head_v2(const V2Call<T>& a, int64_t w, int64_t h, ScratchV2<T>& s, const int64_t* next) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t N = a.N, NP = s.round(N), HDP = s.round(a.hd);
  const V neg_inf = splat(-std::numeric_limits<T>::infinity()), zero = V{};
  load_head_v2(a, h, s, /*v_rows=*/true);
  gemm<T>(N, NP, a.hd, s.qn, HDP, 1, s.knt, NP, s.p, NP);  // q^ k^T
  const T tau = a.scale[h];
  T* lse = a.lse != nullptr ? a.lse + (w * a.nH + h) * N : nullptr;
  // with save_probs, P (rows of NP values, zeros past N) streamed to memory for the backward instead of the lse:
  // it is read back only there, and caching its lines would only evict the forward's working set
  T* probs = a.probs != nullptr ? a.probs + (w * a.nH + h) * N * NP : nullptr;
  for (int64_t i = 0; i < N; ++i) {
    prefetch_row_of_next_window(a, next, h, i, /*backward=*/false);
    T* row = s.p + i * NP;
    scale_add_bias_and_mask(a, h, i, tau, row, s);
    V vmax = neg_inf;
    for (int64_t j = 0; j < NP; j += L) { const V x = load(row + j); vmax = x > vmax ? x : vmax; }
    const T m = hmax<T>(vmax);
    V vsum = zero;
    for (int64_t j = 0; j < NP; j += L) {
      const V e = vexp(load(row + j) - m);  // 0 for the -inf padding columns
      store(row + j, e);
      vsum += e;
    }
    const T sum = hsum<T>(vsum);
    const V inv = splat(T(1) / sum);
    if (probs != nullptr) {
      for (int64_t j = 0; j < NP; j += L) {
        const V pij = load(row + j) * inv;
        store(row + j, pij);
        store_streaming(probs + i * NP + j, pij);
      }
    } else {
      for (int64_t j = 0; j < NP; j += L) store(row + j, load(row + j) * inv);
      lse[i] = m + std::log(sum);
    }
  }
  gemm<T>(N, HDP, N, s.p, NP, 1, s.v, HDP, s.o, HDP);  // O = P v
}

// Forward of windows [begin, end). `source` holds 2 N tokens: the current window's and the next one's.
template <typename S, typename T>
void forward_windows_v2(const WindowAttentionV2Args<S, T>& a, int64_t begin, int64_t end, T* scratch,
                        int64_t* source) {
  ScratchV2<T> s(scratch, a.N, a.nH, a.hd, source);
  const V2Call<T> call = v2_call(a);
  const int64_t N = a.N, HDP = s.round(a.hd);
  int64_t* next_source = source + N;
  for (int64_t w = begin; w < end; ++w) {
    gather_window_v2(a, w, s);
    const int64_t* next = w + 1 < end ? next_source : nullptr;  // prefetched row by row, in the heads
    if (next != nullptr) window_sources_v2(a, w + 1, next_source);
    for (int64_t h = 0; h < a.nH; ++h) {
      forward_head_v2(call, w, h, s, next);
      for (int64_t t = 0; t < N; ++t) {
        if (s.source[t] < 0) continue;
        S* out = a.out + s.source[t] * a.C + h * a.hd;
        const T* o = s.o + t * HDP;
        for (int64_t d = 0; d < a.hd; ++d) out[d] = static_cast<S>(o[d]);
      }
    }
  }
}

// Head h of window w's backward, from the window's gathered rows and dO rows: P (as the forward saved it, else
// recomputed), dV into s.dv, dS (added to d_bias (nH, N, NP), this thread's, in T), then dq into s.o and dk into
// s.gk (through F.normalize's backward), each token's sum_i q^_i . G_i into d_scale[h] and the padded tokens' dk, dv
// into d_pad (nH, 2, hd) (double). next_item: another (window, head) follows in this run (its saved P is
// prefetched). Not inlined: one copy per compute type (V2Call).
template <typename T>
VK_NOINLINE void backward_head_v2(const V2Call<T>& a, int64_t w, int64_t h, ScratchV2<T>& s, const int64_t* next,
                                  bool next_item, T* d_bias, double* d_scale, double* d_pad) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t N = a.N, NP = s.round(N), HDP = s.round(a.hd), C = a.C, hd = a.hd, grad_stride = s.round(C);
  load_head_v2(a, h, s, /*v_rows=*/false);
  for (int64_t t = 0; t < N; ++t) {
    const T* g = s.grad_rows + t * grad_stride + h * hd;
    T* dout = s.dout + t * HDP;
    for (int64_t d = 0; d < hd; ++d) dout[d] = g[d];
  }
  const T tau = a.scale[h];
  // P: as the forward saved it (the next item's, the next block of the same array, is prefetched row by row in
  // the dS loop below), else recomputed, exp(S - lse)
  const T* P = a.probs != nullptr ? a.probs + (w * a.nH + h) * N * NP : s.p;
  const bool next_probs = a.probs != nullptr && next_item;
  if (a.probs == nullptr) {
    gemm<T>(N, NP, hd, s.qn, HDP, 1, s.knt, NP, s.p, NP);
    const T* lse = a.lse + (w * a.nH + h) * N;
    for (int64_t i = 0; i < N; ++i) {
      T* row = s.p + i * NP;
      scale_add_bias_and_mask(a, h, i, tau, row, s);
      for (int64_t j = 0; j < NP; j += L) store(row + j, vexp(load(row + j) - lse[i]));
    }
  }
  // dV = P^T dO
  gemm<T>(N, HDP, N, P, 1, NP, s.dout, HDP, s.dv, HDP);  // P read transposed
  // dP = dO v^T;  dS = P * (dP - delta), into dp;  d_bias += dS
  gemm<T>(N, NP, hd, s.dout, HDP, 1, s.vt, NP, s.dp, NP);
  // V1's scheme: dS added into (nH, N, NP) rows of T in whole vectors, reduced over the threads in double
  // afterwards (reduce_table_grad_double); the per-element double sums it replaced measured the same speed
  T* d_bias_h = d_bias + h * N * NP;
  for (int64_t i = 0; i < N; ++i) {
    prefetch_row_of_next_window(a, next, h, i, /*backward=*/true);
    if (next_probs) prefetch_span(P + (N + i) * NP, NP * static_cast<int64_t>(sizeof(T)), false);
    softmax_backward_row(P + i * NP, s.dp + i * NP, d_bias_h + i * NP, NP);
  }
  // G = dS k^ (rows: the queries' gradient before tau and the normalisation); Gk = dS^T q^
  gemm<T>(N, HDP, N, s.dp, NP, 1, s.kn, HDP, s.o, HDP);
  gemm<T>(N, HDP, N, s.dp, 1, NP, s.qn, HDP, s.gk, HDP);  // dS read transposed
  double scale_acc = 0;
  for (int64_t t = 0; t < N; ++t) {
    T* dq = s.o + t * HDP;  // G_t, turned into dq_t in place
    T* dk = s.gk + t * HDP;
    scale_acc += static_cast<double>(normalize_backward_row(s.qn + t * HDP, dq, s.norm_q[t], tau, hd));
    normalize_backward_row(s.kn + t * HDP, dk, s.norm_k[t], tau, hd);
    if (s.source[t] < 0) {  // a padded token's k and v are the qkv bias: their gradients go to it (its q gets none)
      const T* dv = s.dv + t * HDP;
      double* pad = d_pad + h * 2 * hd;
      for (int64_t d = 0; d < hd; ++d) {
        pad[d] += static_cast<double>(dk[d]);
        pad[hd + d] += static_cast<double>(dv[d]);
      }
    }
  }
  d_scale[h] += scale_acc;
}

// Backward of windows [begin, end): writes dq, dk, dv of real tokens; adds dS into d_bias (nH, N, NP) (in T, whole
// vectors, as V1's), each head's sum_i q^_i . G_i into d_scale (nH) and padded tokens' dk, dv into d_pad (nH, 2, hd)
// (double): this thread's own accumulators.
template <typename S, typename T>
void backward_windows_v2(const WindowAttentionV2Args<S, T>& a, int64_t begin, int64_t end, T* scratch,
                         int64_t* source, T* d_bias, double* d_scale, double* d_pad) {
  ScratchV2<T> s(scratch, a.N, a.nH, a.hd, source);
  const V2Call<T> call = v2_call(a);
  const int64_t N = a.N, HDP = s.round(a.hd), C = a.C, hd = a.hd, grad_stride = s.round(C);
  int64_t* next_source = source + N;
  for (int64_t w = begin; w < end; ++w) {
    gather_window_v2(a, w, s);
    const int64_t* next = w + 1 < end ? next_source : nullptr;  // prefetched row by row, in the heads
    if (next != nullptr) window_sources_v2(a, w + 1, next_source);
    // dO rows of all heads; padded queries were cropped from the output: dO = 0.
    for (int64_t t = 0; t < N; ++t) {
      T* grad = s.grad_rows + t * grad_stride;
      if (s.source[t] >= 0) {
        const S* g = a.grad_out + s.source[t] * C;
        for (int64_t c = 0; c < C; ++c) grad[c] = static_cast<T>(g[c]);
      } else {
        for (int64_t c = 0; c < C; ++c) grad[c] = 0;
      }
    }
    for (int64_t h = 0; h < a.nH; ++h) {
      backward_head_v2(call, w, h, s, next, h + 1 < a.nH || w + 1 < end, d_bias, d_scale, d_pad);
      // the real tokens' q, k, v gradients; in whole vectors where S is T: one scalar loop over the three
      // destinations (which the compiler cannot prove apart from the sources) took ~14% of the backward's samples
      // (Swin V2-T stage 1, b4, 2-core Zen 2; A/B forward + backward 1.05-1.11x at stage 1 b1 / b4 and stage 3 b4)
      for (int64_t t = 0; t < N; ++t) {
        if (s.source[t] < 0) continue;
        S* g = a.grad_qkv + s.source[t] * 3 * C + h * hd;
        convert_scaled(g, s.o + t * HDP, hd, T(1));
        convert_scaled(g + C, s.gk + t * HDP, hd, T(1));
        convert_scaled(g + 2 * C, s.dv + t * HDP, hd, T(1));
      }
    }
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
