// SIMD building blocks of the CPU kernels, compiled once per instruction set: cpu_isa_each.h includes this file
// in each of its instruction-set blocks, before the kernel body, having defined
//   VK_CPU_ISA            the namespace of this instruction set (avx512, avx2, baseline)
//   VK_CPU_VECTOR_BYTES   the width of its registers: 64 (zmm), 32 (ymm), 16 (xmm)
//   VK_CPU_TILE4_MR       rows of the GEMM register tile 4 vectors wide (0: none)
//   VK_CPU_TILE2_MR       rows of the tile 2 vectors wide
//   VK_CPU_TILE1_MR       rows of the tile 1 vector wide
// Deliberately no include guard. Used by the window attention kernels (V1 and V2) and the fused row ops.
//
// Vectors are GCC vector-extension types of the register width (a wider type would be split by the compiler into
// several registers, and it spills them around every FMA), so one source serves every build. Buffers padded to
// kPad = 16 elements hold whole vectors in each build.

namespace vitkernels {
namespace cpu {
namespace VK_CPU_ISA {

#ifndef VK_INLINE
#define VK_INLINE inline __attribute__((always_inline))
#endif

template <typename T> struct Vec;
template <> struct Vec<float> {
  // may_alias: loaded from float arrays; aligned(4): loads need not be aligned to the vector.
  typedef float type __attribute__((vector_size(VK_CPU_VECTOR_BYTES), __may_alias__, aligned(4)));
  typedef int32_t itype __attribute__((vector_size(VK_CPU_VECTOR_BYTES), __may_alias__, aligned(4)));
  static constexpr int lanes = VK_CPU_VECTOR_BYTES / 4;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(VK_CPU_VECTOR_BYTES), __may_alias__, aligned(8)));
  static constexpr int lanes = VK_CPU_VECTOR_BYTES / 8;
};

template <typename T> VK_INLINE typename Vec<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T> VK_INLINE void store(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}
template <typename T> VK_INLINE typename Vec<T>::type splat(T x) { return typename Vec<T>::type{} + x; }

// exp on a vector of floats: Cephes expf (n = round(x / ln 2), r = x - n ln 2 in two parts, degree-6 polynomial, times
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

// log of positive, normal floats (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a degree-9
// polynomial in m - 1, plus e ln 2 in two parts); relative error ~1 ulp. For a softmax's log-sum-exp (sums >= 1).
VK_INLINE Vec<float>::type vlog(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = Vec<float>::itype;
  const I bits = (I)x;
  I e = ((bits >> 23) & 0xff) - 126;
  V m = (V)((bits & 0x807fffff) | 0x3f000000);  // in [0.5, 1)
  const auto low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = (low ? m + m : m) - 1.0f;
  const V fe = __builtin_convertvector(e, V);
  const V z = m * m;
  V y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + fe * 0.693359375f;
}

VK_INLINE Vec<double>::type vlog(Vec<double>::type x) {
  for (int l = 0; l < Vec<double>::lanes; ++l) x[l] = std::log(x[l]);
  return x;
}

// Horizontal max / sum by butterflies (lane l meets lane l ^ w): every lane ends up holding the result.
template <int W, typename V, size_t... I>
VK_INLINE V butterfly(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I ^ W)...);
}
template <typename T> VK_INLINE typename Vec<T>::type all_max(typename Vec<T>::type v) {
  constexpr int L = Vec<T>::lanes;
  using Idx = std::make_index_sequence<L>;
  if constexpr (L >= 16) { const auto s = butterfly<8>(v, Idx{}); v = v > s ? v : s; }
  if constexpr (L >= 8) { const auto s = butterfly<4>(v, Idx{}); v = v > s ? v : s; }
  if constexpr (L >= 4) { const auto s = butterfly<2>(v, Idx{}); v = v > s ? v : s; }
  const auto s = butterfly<1>(v, Idx{});
  return v > s ? v : s;
}
template <typename T> VK_INLINE typename Vec<T>::type all_sum(typename Vec<T>::type v) {
  constexpr int L = Vec<T>::lanes;
  using Idx = std::make_index_sequence<L>;
  if constexpr (L >= 16) v += butterfly<8>(v, Idx{});
  if constexpr (L >= 8) v += butterfly<4>(v, Idx{});
  if constexpr (L >= 4) v += butterfly<2>(v, Idx{});
  return v + butterfly<1>(v, Idx{});
}
template <typename T> VK_INLINE T hmax(typename Vec<T>::type v) { return all_max<T>(v)[0]; }
template <typename T> VK_INLINE T hsum(typename Vec<T>::type v) { return all_sum<T>(v)[0]; }

// In-register transpose of L x L values (L = the vector's lanes): r[i][l] <-> r[l][i]. log2(L) rounds; round b
// swaps the off-diagonal b x b blocks of every 2b x 2b block, with one two-source shuffle per output vector.
template <int B, int L, typename V, size_t... I>
VK_INLINE V interleave_low(V x, V y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, ((I & B) ? L + I - B : I)...);
}
template <int B, int L, typename V, size_t... I>
VK_INLINE V interleave_high(V x, V y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, ((I & B) ? L + I : I + B)...);
}
template <int B, int L, typename V>
VK_INLINE void transpose_round(V* r) {
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i & B) continue;
    const V lo = interleave_low<B, L>(r[i], r[i + B], std::make_index_sequence<L>{});
    const V hi = interleave_high<B, L>(r[i], r[i + B], std::make_index_sequence<L>{});
    r[i] = lo;
    r[i + B] = hi;
  }
}
template <typename T>
VK_INLINE void transpose_in_registers(typename Vec<T>::type* r) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  if constexpr (L >= 16) transpose_round<8, L, V>(r);
  if constexpr (L >= 8) transpose_round<4, L, V>(r);
  if constexpr (L >= 4) transpose_round<2, L, V>(r);
  transpose_round<1, L, V>(r);
}

// --- GEMM on cache-resident blocks ---------------------------------------------------------------------------------
//   C[i, 0:NC] = C0[i, 0:NC] + sum_{k < K} A(i, k) * B[k * ldb + 0:NC],   i < M,   A(i, k) = A[i * a_row + k * a_col]
// C0 (same row stride as C) may be null (zeros). A is read one scalar at a time (broadcast), so A^T costs nothing
// (a_row = 1, a_col = its row stride). NC, ldb, ldc are multiples of the vector width: callers keep their matrices
// zero-padded to whole vectors, so tiles never have a ragged column edge.

template <typename T, int MR, int NV>
VK_INLINE void gemm_tile(int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
                         int64_t ldc, const T* C0) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[MR][NV];
  if (C0 != nullptr) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = load(C0 + r * ldc + v * L);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * a_row + k * a_col];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * L, acc[r][v]);
}

template <typename T, int MR, int NV>
VK_INLINE void gemm_columns(int64_t M, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                            T* C, int64_t ldc, const T* C0) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    gemm_tile<T, MR, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, C0 ? C0 + i * ldc : nullptr);
  }
  for (; i < M; ++i) {
    gemm_tile<T, 1, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, C0 ? C0 + i * ldc : nullptr);
  }
}

template <typename T>
VK_INLINE void gemm(int64_t M, int64_t NC, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                    int64_t ldb, T* C, int64_t ldc, const T* C0 = nullptr) {
  constexpr int L = Vec<T>::lanes;
  int64_t j = 0;
#if VK_CPU_TILE4_MR > 0
  for (; j + 4 * L <= NC; j += 4 * L) {
    gemm_columns<T, VK_CPU_TILE4_MR, 4>(M, K, A, a_row, a_col, B + j, ldb, C + j, ldc, C0 ? C0 + j : nullptr);
  }
#endif
  for (; j + 2 * L <= NC; j += 2 * L) {
    gemm_columns<T, VK_CPU_TILE2_MR, 2>(M, K, A, a_row, a_col, B + j, ldb, C + j, ldc, C0 ? C0 + j : nullptr);
  }
  for (; j < NC; j += L) {
    gemm_columns<T, VK_CPU_TILE1_MR, 1>(M, K, A, a_row, a_col, B + j, ldb, C + j, ldc, C0 ? C0 + j : nullptr);
  }
}

}  // namespace VK_CPU_ISA
}  // namespace cpu
}  // namespace vitkernels
