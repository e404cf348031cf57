// Body of the CPU Swin window attention (csrc/cpu/window_attention.cpp): the per-(window, head) forward and
// backward, written once and compiled once per instruction set. window_attention.cpp includes this file several
// times, each time under a different `#pragma GCC target` (AVX-512, AVX2+FMA, the x86-64 baseline) and with a
// different VK_CPU_ISA namespace name, and picks one at run time (the binary runs on any x86-64 CPU, and uses
// AVX-512 where there is one). Deliberately no include guard.
//
// Before including, define:
//   VK_CPU_ISA      the namespace for this instruction set
//   VK_CPU_MR       rows of the GEMM register tile
//   VK_CPU_NV       vectors (of 64 bytes) per row of the GEMM register tile
// and include window_attention.cpp's WindowAttentionArgs.
//
// Math, per window w and head h (N tokens, padded tokens read `pad_row`, the qkv Linear's bias or zeros):
//   S = (scale q) k^T + table[rel(i, j), h] + mask(i, j),  P = softmax_j(S),  O = P v,  lse_i = log sum_j exp S_ij
// backward, recomputing P = exp(S - lse) (delta_i = sum_d dO_id O_id):
//   dV = P^T dO,  dP = dO v^T,  dS = P * (dP - delta),  dQ = scale dS k,  dK = dS^T (scale q),  d_bias += dS.
//
// Everything is fp32 for fp32 / bf16 / fp16 storage (double for double). The GEMMs are small (N x N x hd), done
// by a register-tiled kernel over GCC vector types; matrices live in per-thread scratch whose row strides are
// multiples of 16 elements (whole 64-byte vectors), zero-padded, so tiles never need a ragged edge in columns.

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

#define VK_INLINE inline __attribute__((always_inline))

template <typename T> struct Vec;
template <> struct Vec<float> {
  // may_alias: loaded from float arrays; aligned(4): loads need not be 64-byte aligned (they are, in practice).
  typedef float type __attribute__((vector_size(64), __may_alias__, aligned(4)));
  typedef int32_t itype __attribute__((vector_size(64), __may_alias__, aligned(4)));
  static constexpr int lanes = 16;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(64), __may_alias__, aligned(8)));
  static constexpr int lanes = 8;
};

template <typename T> VK_INLINE typename Vec<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T> VK_INLINE void store(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}
template <typename T> VK_INLINE typename Vec<T>::type splat(T x) { return typename Vec<T>::type{} + x; }

// exp on 16 floats: Cephes expf (n = round(x / ln 2), r = x - n ln 2 in two parts, degree-6 polynomial, times
// 2^n built in the exponent bits); relative error ~2 ulp. exp(x) for x < -80 (< 1.8e-35) is returned as 0, -inf
// included: a softmax's masked entries (-100) would otherwise become subnormal probabilities, and subnormal
// operands make every FMA that touches them ~100x slower. Inputs above 88 are clamped (softmax inputs are <= 0).
VK_INLINE Vec<float>::type vexp(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = Vec<float>::itype;
  const V hi = splat(88.0f), cutoff = splat(-80.0f);
  const auto underflow = x < cutoff;
  x = x > hi ? hi : x;
  x = underflow ? cutoff : x;
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  const I ni = (I)t - (I)magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return underflow ? V{} : y * (V)((ni + 127) << 23);
}

// The double path exists for gradcheck; its exp is the C library's.
VK_INLINE Vec<double>::type vexp(Vec<double>::type x) {
  for (int l = 0; l < Vec<double>::lanes; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename T> VK_INLINE T hmax(typename Vec<T>::type v) {
  T m = v[0];
  for (int l = 1; l < Vec<T>::lanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
template <typename T> VK_INLINE T hsum(typename Vec<T>::type v) {
  T s = v[0];
  for (int l = 1; l < Vec<T>::lanes; ++l) s += v[l];
  return s;
}

// --- GEMM: C[i, 0:NC] = sum_{k < K} A[i*lda + k] * B[k*ldb + 0:NC],  i < M --------------------------------------
// NC, ldb, ldc are multiples of the vector width; A is read one scalar at a time (broadcast).

template <typename T, int MR, int NV>
VK_INLINE void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * L, acc[r][v]);
}

template <typename T, int NV>
VK_INLINE void gemm_columns(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                            int64_t ldc) {
  int64_t i = 0;
  for (; i + VK_CPU_MR <= M; i += VK_CPU_MR) gemm_tile<T, VK_CPU_MR, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) gemm_tile<T, 1, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
}

template <typename T>
VK_INLINE void gemm(int64_t M, int64_t NC, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc) {
  constexpr int L = Vec<T>::lanes;
  int64_t j = 0;
  for (; j + VK_CPU_NV * L <= NC; j += VK_CPU_NV * L) gemm_columns<T, VK_CPU_NV>(M, K, A, lda, B + j, ldb, C + j, ldc);
  for (; j < NC; j += L) gemm_columns<T, 1>(M, K, A, lda, B + j, ldb, C + j, ldc);
}

// --- per-window pieces ---------------------------------------------------------------------------------------------

// Scratch of one thread: the window's qkv rows (and, in the backward, its output-gradient rows), then one head's
// matrices, of N or NP rows with strides NP (keys) or HDP (channels), each 64-byte aligned and zero-padded.
template <typename T>
struct Scratch {
  T *rows, *grad_rows, *q, *k, *kt, *v, *vt, *dout, *p, *dp, *pt, *dq, *dk, *dv, *region, *delta;
  int64_t* source;

  static int64_t round(int64_t n) { return (n + kPad - 1) / kPad * kPad; }
  // Elements of T the buffers take for N tokens, nH heads of head_dim hd (the forward uses a subset).
  static int64_t size(int64_t N, int64_t nH, int64_t hd) {
    const int64_t NP = round(N), HDP = round(hd), C = nH * hd;
    return N * round(3 * C) + N * round(C) + 6 * round(N * HDP) + 2 * HDP * NP + 3 * round(N * NP) +
           NP + nH * NP + 2 * kPad;
  }
  Scratch(T* base, int64_t N, int64_t nH, int64_t hd, int64_t* source_rows) : source(source_rows) {
    const int64_t NP = round(N), HDP = round(hd), C = nH * hd;
    T* at = base;
    auto take = [&at](int64_t n) { T* p = at; at += round(n); return p; };
    rows = take(N * round(3 * C)); grad_rows = take(N * round(C));
    q = take(N * HDP); k = take(N * HDP); dout = take(N * HDP); dq = take(N * HDP); dk = take(N * HDP);
    dv = take(N * HDP); v = dv;  // the forward's v and the backward's dv never coexist
    kt = take(HDP * NP); vt = take(HDP * NP);
    p = take(N * NP); dp = take(N * NP); pt = take(N * NP);
    region = take(NP); delta = take(nH * NP);
  }
};

// Window w: each token's source token (-1 for padding) and mask region id, and its qkv rows (a padded token's are
// `pad_row`), gathered once for all heads: whole rows, read in order, instead of one head's slices at a time.
template <typename S, typename T>
VK_INLINE void gather_window(const WindowAttentionArgs<S, T>& a, int64_t w, Scratch<T>& s) {
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

// Head h's q (scaled), k (transposed, and as rows if k_rows), v (as rows if v_rows, else transposed) from the
// gathered rows.
template <typename S, typename T>
VK_INLINE void load_head(const WindowAttentionArgs<S, T>& a, int64_t h, Scratch<T>& s, bool k_rows, bool v_rows) {
  const int64_t HDP = s.round(a.hd), NP = s.round(a.N), stride = s.round(3 * a.C);
  const T scale = static_cast<T>(a.scale);
  for (int64_t t = 0; t < a.N; ++t) {
    const T* row = s.rows + t * stride + h * a.hd;
    const T* krow = row + a.C;
    const T* vrow = row + 2 * a.C;
    T* q = s.q + t * HDP;
    for (int64_t d = 0; d < a.hd; ++d) q[d] = row[d] * scale;
    for (int64_t d = 0; d < a.hd; ++d) s.kt[d * NP + t] = krow[d];
    if (k_rows) {
      T* k = s.k + t * HDP;
      for (int64_t d = 0; d < a.hd; ++d) k[d] = krow[d];
    }
    if (v_rows) {
      T* v = s.v + t * HDP;
      for (int64_t d = 0; d < a.hd; ++d) v[d] = vrow[d];
    } else {
      for (int64_t d = 0; d < a.hd; ++d) s.vt[d * NP + t] = vrow[d];
    }
  }
}

// Row i of S (NP entries, computed q k^T) += bias + mask; -inf past N (the bias rows carry it).
template <typename S, typename T>
VK_INLINE void add_bias_and_mask(const WindowAttentionArgs<S, T>& a, int64_t h, int64_t i, T* row,
                                 const Scratch<T>& s) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t NP = s.round(a.N);
  const T* bias = a.bias_rows + (h * a.N + i) * NP;
  if (a.shifted) {
    const V region_i = splat(s.region[i]);
    const V masked = splat(static_cast<T>(kMaskValue)), zero = V{};
    for (int64_t j = 0; j < NP; j += L) {
      store(row + j, load(row + j) + load(bias + j) + (load(s.region + j) != region_i ? masked : zero));
    }
  } else {
    for (int64_t j = 0; j < NP; j += L) store(row + j, load(row + j) + load(bias + j));
  }
}

// Forward of windows [begin, end).
template <typename S, typename T>
void forward_windows(const WindowAttentionArgs<S, T>& a, int64_t begin, int64_t end, T* scratch, int64_t* source) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  Scratch<T> s(scratch, a.N, a.nH, a.hd, source);
  const int64_t N = a.N, NP = s.round(N), HDP = s.round(a.hd);
  const V neg_inf = splat(-std::numeric_limits<T>::infinity()), zero = V{};
  for (int64_t w = begin; w < end; ++w) {
    gather_window(a, w, s);
    for (int64_t h = 0; h < a.nH; ++h) {
      load_head(a, h, s, /*k_rows=*/false, /*v_rows=*/true);
      gemm<T>(N, NP, a.hd, s.q, HDP, s.kt, NP, s.p, NP);  // S = (scale q) k^T
      T* lse = a.lse + (w * a.nH + h) * N;
      for (int64_t i = 0; i < N; ++i) {
        T* row = s.p + i * NP;
        add_bias_and_mask(a, h, i, row, s);
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
        for (int64_t j = 0; j < NP; j += L) store(row + j, load(row + j) * inv);
        lse[i] = m + std::log(sum);
      }
      gemm<T>(N, HDP, N, s.p, NP, s.v, HDP, s.dq, HDP);  // O = P v (into the dq buffer, unused in the forward)
      for (int64_t t = 0; t < N; ++t) {
        if (s.source[t] < 0) continue;
        S* out = a.out + s.source[t] * a.C + h * a.hd;
        const T* o = s.dq + t * HDP;
        for (int64_t d = 0; d < a.hd; ++d) out[d] = static_cast<S>(o[d]);
      }
    }
  }
}

// Backward of windows [begin, end): writes dq, dk, dv of real tokens; adds dS into d_bias (nH, N, N) and padded
// tokens' dk, dv into d_pad (nH, 2, hd), both this thread's own double accumulators.
template <typename S, typename T>
void backward_windows(const WindowAttentionArgs<S, T>& a, int64_t begin, int64_t end, T* scratch, int64_t* source,
                      double* d_bias, double* d_pad) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  Scratch<T> s(scratch, a.N, a.nH, a.hd, source);
  const int64_t N = a.N, NP = s.round(N), HDP = s.round(a.hd), C = a.C, hd = a.hd, grad_stride = s.round(C);
  const T scale = static_cast<T>(a.scale);
  for (int64_t w = begin; w < end; ++w) {
    gather_window(a, w, s);
    // dO rows and delta = rowsum(dO * O) per head; padded queries were cropped from the output: dO = 0.
    for (int64_t t = 0; t < N; ++t) {
      T* grad = s.grad_rows + t * grad_stride;
      if (s.source[t] >= 0) {
        const S* g = a.grad_out + s.source[t] * C;
        const S* o = a.out_in + s.source[t] * C;
        for (int64_t h = 0; h < a.nH; ++h) {
          T delta = 0;
          for (int64_t d = h * hd; d < (h + 1) * hd; ++d) {
            grad[d] = static_cast<T>(g[d]);
            delta += grad[d] * static_cast<T>(o[d]);
          }
          s.delta[h * NP + t] = delta;
        }
      } else {
        for (int64_t c = 0; c < C; ++c) grad[c] = 0;
        for (int64_t h = 0; h < a.nH; ++h) s.delta[h * NP + t] = 0;
      }
    }
    for (int64_t h = 0; h < a.nH; ++h) {
      load_head(a, h, s, /*k_rows=*/true, /*v_rows=*/false);
      for (int64_t t = 0; t < N; ++t) {
        const T* g = s.grad_rows + t * grad_stride + h * hd;
        T* dout = s.dout + t * HDP;
        for (int64_t d = 0; d < hd; ++d) dout[d] = g[d];
      }
      // P = exp(S - lse), recomputed.
      gemm<T>(N, NP, hd, s.q, HDP, s.kt, NP, s.p, NP);
      const T* lse = a.lse + (w * a.nH + h) * N;
      for (int64_t i = 0; i < N; ++i) {
        T* row = s.p + i * NP;
        add_bias_and_mask(a, h, i, row, s);
        for (int64_t j = 0; j < NP; j += L) store(row + j, vexp(load(row + j) - lse[i]));
      }
      // dV = P^T dO
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) s.pt[j * NP + i] = s.p[i * NP + j];
      gemm<T>(N, HDP, N, s.pt, NP, s.dout, HDP, s.dv, HDP);
      // dP = dO v^T;  dS = P * (dP - delta), into dp;  d_bias += dS
      gemm<T>(N, NP, hd, s.dout, HDP, s.vt, NP, s.dp, NP);
      double* d_bias_h = d_bias + h * N * N;
      for (int64_t i = 0; i < N; ++i) {
        T* dp = s.dp + i * NP;
        const T* p = s.p + i * NP;
        const V delta = splat(s.delta[h * NP + i]);
        for (int64_t j = 0; j < NP; j += L) store(dp + j, load(p + j) * (load(dp + j) - delta));
        double* acc = d_bias_h + i * N;
        for (int64_t j = 0; j < N; ++j) acc[j] += static_cast<double>(dp[j]);
      }
      // dQ = scale dS k;  dK = dS^T (scale q)
      gemm<T>(N, HDP, N, s.dp, NP, s.k, HDP, s.dq, HDP);
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) s.pt[j * NP + i] = s.dp[i * NP + j];
      gemm<T>(N, HDP, N, s.pt, NP, s.q, HDP, s.dk, HDP);
      for (int64_t t = 0; t < N; ++t) {
        const T* dq = s.dq + t * HDP;
        const T* dk = s.dk + t * HDP;
        const T* dv = s.dv + t * HDP;
        if (s.source[t] >= 0) {
          S* g = a.grad_qkv + s.source[t] * 3 * C + h * hd;
          for (int64_t d = 0; d < hd; ++d) {
            g[d] = static_cast<S>(dq[d] * scale);
            g[C + d] = static_cast<S>(dk[d]);
            g[2 * C + d] = static_cast<S>(dv[d]);
          }
        } else {  // a padded token's k and v are the qkv bias: their gradients go to it (its q gets none: dO = 0)
          double* pad = d_pad + h * 2 * hd;
          for (int64_t d = 0; d < hd; ++d) {
            pad[d] += static_cast<double>(dk[d]);
            pad[hd + d] += static_cast<double>(dv[d]);
          }
        }
      }
    }
  }
}

#undef VK_INLINE

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
