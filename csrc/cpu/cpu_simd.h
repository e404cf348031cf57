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
#ifndef VK_NOINLINE
#define VK_NOINLINE __attribute__((noinline))
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

// exp for floats known to lie in [-87, 88] (no clamping, no underflow handling): Cephes expf, n = round(x / ln 2),
// r = x - n ln 2 in two parts, degree-6 polynomial, times 2^n; relative error ~2 ulp. On AVX-512 the rounding and
// the 2^n scaling are one instruction each (vrndscaleps, vscalefps); elsewhere 2^n is built in the exponent bits.
VK_INLINE Vec<float>::type vexp_bounded(Vec<float>::type x) {
  using V = Vec<float>::type;
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 64
  const V n = (V)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  using I = Vec<float>::itype;
  const V magic = splat(12582912.0f);
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  const I ni = (I)t - (I)magic;
#endif
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 64
  return (V)_mm512_scalef_ps((__m512)y, (__m512)n);
#else
  return y * (V)((ni + 127) << 23);
#endif
}

// exp on a vector of floats (vexp_bounded on the clamped argument). exp(x) for x < -80 (< 1.8e-35) is returned as
// 0, -inf included: a softmax's masked entries (-100) would otherwise become subnormal probabilities, and subnormal
// operands make every FMA that touches them ~100x slower. Inputs above 88 are clamped (softmax inputs are <= 0).
VK_INLINE Vec<float>::type vexp(Vec<float>::type x) {
  using V = Vec<float>::type;
  const V hi = splat(88.0f), cutoff = splat(-80.0f);
  const auto underflow = x < cutoff;
  x = x > hi ? hi : x;
  x = underflow ? cutoff : x;
  return underflow ? V{} : vexp_bounded(x);
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

// 1 / d for floats: the hardware's reciprocal estimate refined by one Newton step (relative error ~1e-7, at a
// fraction of a division's cost); a division where there is no estimate instruction.
VK_INLINE Vec<float>::type vrcp(Vec<float>::type d) {
  using V = Vec<float>::type;
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 64
  const V r = (V)_mm512_rcp14_ps((__m512)d);
#elif defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 32
  const V r = (V)_mm256_rcp_ps((__m256)d);
#elif defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 16
  const V r = (V)_mm_rcp_ps((__m128)d);
#else
  const V r = 1.0f / d;
  return r;
#endif
#ifdef VK_CPU_X86
  return r * (2.0f - d * r);
#endif
}

// erf on a vector of floats: Abramowitz & Stegun 7.1.26, erf|x| = 1 - t (p1 + t (p2 + ... p5 t)) exp(-x^2) with
// t = 1 / (1 + p |x|), absolute error < 1.5e-7 (the formula of ATen's vectorised erf, behind its GELU). Also
// returns exp(-x^2) in *gauss (the GELU derivative needs it).
VK_INLINE Vec<float>::type verf(Vec<float>::type x, Vec<float>::type* gauss = nullptr) {
  using V = Vec<float>::type;
  using I = Vec<float>::itype;
  const I sign = (I)x & std::numeric_limits<int32_t>::min();  // the sign bits
  const V ax = (V)((I)x ^ sign);
  const V t = vrcp(0.3275911f * ax + 1.0f);
  V r = 1.061405429f * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const V x2 = x * x;
  const V e = vexp_bounded(-(x2 < 80.0f ? x2 : splat(80.0f)));  // exp(-80) ~ 1.8e-35: erf is +-1 in float there
  if (gauss != nullptr) *gauss = e;
  const V y = 1.0f - r * t * e;
  return (V)((I)y ^ sign);
}

VK_INLINE Vec<double>::type verf(Vec<double>::type x, Vec<double>::type* gauss = nullptr) {
  if (gauss != nullptr) {
    for (int l = 0; l < Vec<double>::lanes; ++l) (*gauss)[l] = std::exp(-x[l] * x[l]);
  }
  for (int l = 0; l < Vec<double>::lanes; ++l) x[l] = std::erf(x[l]);
  return x;
}

// erf on a vector of floats without an exp: the odd rational minimax approximation erf(x) = x P(x^2) / Q(x^2) on x
// clamped to [-4, 4] (erf(4) = 1 - 1.5e-8 rounds to 1 in float), P of degree 6 and Q of degree 4 in x^2 (the
// coefficients of Eigen's and XLA's float erf). ~17 vector operations against ~28 for verf's form with its exp:
// for the GELU forward, which needs no exp(-x^2). The division is vrcp's refined reciprocal.
VK_INLINE Vec<float>::type verf_rational(Vec<float>::type x) {
  using V = Vec<float>::type;
  x = x > 4.0f ? splat(4.0f) : x;
  x = x < -4.0f ? splat(-4.0f) : x;
  const V x2 = x * x;
  V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  V q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p * vrcp(q);
}

VK_INLINE Vec<double>::type verf_rational(Vec<double>::type x) { return verf(x); }

// tanh(x) = sign(x) (1 - 2 / (exp(2 |x|) + 1)), |x| clamped to 10; absolute error ~1e-7. Computed on |x| so that
// tanh(+-10) is exactly +-1: on the negative side 1 - 2 / (exp(2x) + 1) came out at -0.99999994 (vrcp(1) is not
// exact), and the tanh GELU's derivative, which multiplies 1 - tanh^2 by ~x^3, then gave -2.8e-3 instead of 0 at
// x = -60.
VK_INLINE Vec<float>::type vtanh(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = Vec<float>::itype;
  const I sign = (I)x & std::numeric_limits<int32_t>::min();  // the sign bits
  V ax = (V)((I)x ^ sign);
  ax = ax > 10.0f ? splat(10.0f) : ax;
  const V t = 1.0f - 2.0f * vrcp(vexp(ax + ax) + 1.0f);
  return (V)((I)t ^ sign);
}

VK_INLINE Vec<double>::type vtanh(Vec<double>::type x) {
  for (int l = 0; l < Vec<double>::lanes; ++l) x[l] = std::tanh(x[l]);
  return x;
}

// GELU and its derivative, exact (erf) or tanh-approximated, as torch.nn.functional.gelu(approximate=...).
template <typename T>
VK_INLINE typename Vec<T>::type vgelu(typename Vec<T>::type x, bool tanh_approx) {
  if (tanh_approx) {
    const auto inner = static_cast<T>(0.7978845608028654) * (x + static_cast<T>(0.044715) * x * x * x);
    return static_cast<T>(0.5) * x * (1 + vtanh(inner));
  }
  return static_cast<T>(0.5) * x * (1 + verf_rational(x * static_cast<T>(0.7071067811865476)));
}
template <typename T>
VK_INLINE typename Vec<T>::type vgelu_grad(typename Vec<T>::type x, bool tanh_approx) {
  if (tanh_approx) {
    const T k = static_cast<T>(0.7978845608028654), c = static_cast<T>(0.044715);
    const auto th = vtanh(k * (x + c * x * x * x));
    return static_cast<T>(0.5) * (1 + th) + static_cast<T>(0.5) * x * (1 - th * th) * k * (1 + 3 * c * x * x);
  }
  typename Vec<T>::type gauss;  // exp(-x^2 / 2), from inside the erf
  const auto cdf = static_cast<T>(0.5) * (1 + verf(x * static_cast<T>(0.7071067811865476), &gauss));
  return cdf + x * static_cast<T>(0.3989422804014327) * gauss;
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

// v stored at p (vector-aligned) bypassing the caches where the instruction set has a streaming store: for data
// written once and read back much later (no read-for-ownership of the lines, no eviction of the working set).
template <typename T> VK_INLINE void store_streaming(T* p, typename Vec<T>::type v) {
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 64
  if constexpr (std::is_same<T, float>::value) _mm512_stream_ps(p, (__m512)v);
  else _mm512_stream_pd(p, (__m512d)v);
#elif defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 32
  if constexpr (std::is_same<T, float>::value) _mm256_stream_ps(p, (__m256)v);
  else _mm256_stream_pd(p, (__m256d)v);
#else
  store(p, v);
#endif
}

// Orders the streaming stores before every later store (they are weakly ordered): once at the end of a thread's
// run, before another thread may read what they wrote.
VK_INLINE void streaming_fence() {
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES >= 32
  _mm_sfence();
#endif
}

// The first n (< lanes) values at p as a vector, zeros after; and the first n lanes of v stored at p.
template <typename T> VK_INLINE typename Vec<T>::type load_partial(const T* p, int64_t n) {
  typename Vec<T>::type v{};
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
template <typename T> VK_INLINE void store_partial(T* p, typename Vec<T>::type v, int64_t n) {
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
}

// --- bfloat16 storage of the row ops and patch merging: n values widened to float / rounded back -----------------
// Widening is exact (the 16 bits become the float's high half). Rounding is to nearest even, and a NaN becomes 0xFFFF:
// what ATen's vectorised float -> bfloat16 conversion (Tensor.to, copy_) gives, so the row ops' bfloat16 results
// are bitwise those of converting the whole tensors. Plain loops, vectorised by the compiler for this instruction
// set; not always_inline: the host code calls them through VK_CPU_CALL.
inline void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    __builtin_memcpy(dst + i, &u, sizeof u);
  }
}
inline void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    __builtin_memcpy(&u, src + i, sizeof u);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dst[i] = src[i] != src[i] ? static_cast<uint16_t>(0xFFFF) : rounded;
  }
}

// The same conversions one vector at a time, in registers: a row kernel templated on its storage type reads a
// bfloat16 tensor as float vectors and writes float vectors back as bfloat16 through these overloads of load / store
// (and their partial forms), without the float copy in memory. Non-template overloads: a kernel's load(p) on a
// c10::BFloat16* picks them, on a float* the templates above. Only for kernels whose arithmetic is straight-line
// code on registers (bias_gelu): its bfloat16 instantiation then contracts the same multiply-adds into FMAs as the
// float one and its rows are bitwise the float op's, rounded. Where a loop has loop-invariant branches or re-reads
// its inputs (the scaled residual, the LayerNorm rows), GCC unswitched and CSE'd the two instantiations differently
// and so fused different multiply-adds (measured: results one bfloat16 ulp apart in the fuzz); those ops keep their
// float kernel and convert through L1 scratch (row_ops_bf16.h).
typedef uint16_t Bf16Bits __attribute__((vector_size(VK_CPU_VECTOR_BYTES / 2), __may_alias__, aligned(2)));
typedef uint32_t FloatBits __attribute__((vector_size(VK_CPU_VECTOR_BYTES), __may_alias__, aligned(4)));

VK_INLINE Vec<float>::type widen_bf16(Bf16Bits h) {
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 64
  const FloatBits u = reinterpret_cast<FloatBits>(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)));
#else
  const FloatBits u = __builtin_convertvector(h, FloatBits);
#endif
  return reinterpret_cast<Vec<float>::type>(u << 16);
}
VK_INLINE Bf16Bits round_to_bf16(Vec<float>::type v) {
  const FloatBits u = reinterpret_cast<FloatBits>(v);
  const FloatBits rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const FloatBits bits = v != v ? FloatBits{} + 0xFFFFu : rounded;
#if defined(VK_CPU_X86) && VK_CPU_VECTOR_BYTES == 64
  return reinterpret_cast<Bf16Bits>(_mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(bits)));
#else
  return __builtin_convertvector(bits, Bf16Bits);
#endif
}
VK_INLINE Vec<float>::type load(const c10::BFloat16* p) { return widen_bf16(*reinterpret_cast<const Bf16Bits*>(p)); }
VK_INLINE void store(c10::BFloat16* p, Vec<float>::type v) { *reinterpret_cast<Bf16Bits*>(p) = round_to_bf16(v); }
VK_INLINE Vec<float>::type load_partial(const c10::BFloat16* p, int64_t n) {
  Bf16Bits h{};
  for (int64_t l = 0; l < n; ++l) h[l] = p[l].x;
  return widen_bf16(h);
}
VK_INLINE void store_partial(c10::BFloat16* p, Vec<float>::type v, int64_t n) {
  const Bf16Bits h = round_to_bf16(v);
  for (int64_t l = 0; l < n; ++l) p[l].x = h[l];
}

// The row kernels prefetch row r + kRowsAhead of their inputs (prefetch_row: bytes [0, C * sizeof(S)) of it) while
// row r is computed: their arithmetic per vector is long (GELU, LayerNorm), so the out-of-order core keeps few of a
// row's loads in flight, and a cold row (a GEMM output in L3 or memory: the model's case) would be fetched at
// latency, not bandwidth. Measured in the Swin-T step (profile, vs no prefetch): bias + GELU 1.1-1.4x faster at
// stages 1-3; warm repeated calls on one tensor (a micro-benchmark) do not show it.
constexpr int64_t kRowsAhead = 4;
template <typename S>
VK_INLINE void prefetch_row(const S* row, int64_t C) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < C * static_cast<int64_t>(sizeof(S)); b += 64) __builtin_prefetch(p + b, 0, 3);
}

// dst[0:n] = scale * src[0:n], computed in F (the kernel's compute type) and stored as D; whole vectors where all
// three types agree (the window attention kernels' row gathers and scatters).
template <typename D, typename Src, typename F>
VK_INLINE void convert_scaled(D* dst, const Src* src, int64_t n, F scale) {
  int64_t d = 0;
  if constexpr (std::is_same<D, F>::value && std::is_same<Src, F>::value) {
    using V = typename Vec<F>::type;
    constexpr int L = Vec<F>::lanes;
    const V sc = splat(scale);
    for (; d + L <= n; d += L) store(dst + d, load(src + d) * sc);
  }
  for (; d < n; ++d) dst[d] = static_cast<D>(static_cast<F>(src[d]) * scale);
}

// Prefetch into L2 the cache lines of `bytes` bytes at p (for writing if `write`): the window attention kernels'
// scattered head slices of the next item / window.
VK_INLINE void prefetch_span(const void* p, int64_t bytes, bool write) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) / 64, last = (reinterpret_cast<uintptr_t>(p) + bytes - 1) / 64;
  for (uintptr_t line = first; line <= last; ++line) {
    if (write) __builtin_prefetch(reinterpret_cast<const void*>(line * 64), 1, 2);
    else __builtin_prefetch(reinterpret_cast<const void*>(line * 64), 0, 2);
  }
}

// The token rows a window attention kernel's next item / window reads and writes, for prefetching: its q, k, v in
// qkv (rows of 3C); in the forward its output (rows of C, for writing); in the backward its output gradient and its
// q, k, v gradients (for writing). Elements of `element_bytes` bytes: the storage type, which the kernels'
// compute-type code does not know (their middles are compiled once per compute type).
struct TokenRows {
  const void* qkv;
  const void* out;
  const void* grad_out;
  const void* grad_qkv;
  int64_t element_bytes;
};

template <typename S>
VK_INLINE TokenRows token_rows(const S* qkv, const S* out, const S* grad_out, const S* grad_qkv) {
  return TokenRows{qkv, out, grad_out, grad_qkv, static_cast<int64_t>(sizeof(S))};
}

// Prefetch head slice [off, off + hd) of token `token`'s rows (TokenRows).
VK_INLINE void prefetch_token_slices(const TokenRows& rows, int64_t token, int64_t C, int64_t off, int64_t hd,
                                     bool backward) {
  const int64_t es = rows.element_bytes, bytes = hd * es, row = C * es;
  const char* q = static_cast<const char*>(rows.qkv) + (token * 3 * C + off) * es;
  prefetch_span(q, bytes, false);
  prefetch_span(q + row, bytes, false);
  prefetch_span(q + 2 * row, bytes, false);
  if (backward) {
    prefetch_span(static_cast<const char*>(rows.grad_out) + (token * C + off) * es, bytes, false);
    const char* grad = static_cast<const char*>(rows.grad_qkv) + (token * 3 * C + off) * es;
    prefetch_span(grad, bytes, true);
    prefetch_span(grad + row, bytes, true);
    prefetch_span(grad + 2 * row, bytes, true);
  } else {
    prefetch_span(static_cast<const char*>(rows.out) + (token * C + off) * es, bytes, true);
  }
}

// The softmax backward of one attention row, in place, and the bias table's share: dS = P * (dP - delta), delta =
// sum_j P_j dP_j (which equals dO . O: O = P v, dP = dO v^T), over np values (whole vectors; P is 0 in the padding
// columns, so dS is too); dp becomes dS and acc += dS.
template <typename T>
VK_INLINE void softmax_backward_row(const T* p, T* dp, T* acc, int64_t np) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V dot = V{};
  for (int64_t j = 0; j < np; j += L) dot += load(p + j) * load(dp + j);
  const V delta = all_sum<T>(dot);
  for (int64_t j = 0; j < np; j += L) {
    const V ds = load(p + j) * (load(dp + j) - delta);
    store(dp + j, ds);
    store(acc + j, load(acc + j) + ds);
  }
}

// --- LayerNorm of one row of C values ------------------------------------------------------------------------------
// The sum of f(j) over a row's whole vectors j = 0, L, ..., full - L, in four partial sums: with one, each add waits
// for the previous one (3-4 cycles), and a 96-wide row's statistics passes were latency-bound (a third of the fused
// bias + residual + LayerNorm's time on a Zen 3).
template <typename T, typename F>
VK_INLINE typename Vec<T>::type sum_row_vectors(int64_t full, F f) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
  int64_t j = 0;
  for (; j + 4 * L <= full; j += 4 * L) {
    a0 += f(j);
    a1 += f(j + L);
    a2 += f(j + 2 * L);
    a3 += f(j + 3 * L);
  }
  for (; j < full; j += L) a0 += f(j);
  return (a0 + a1) + (a2 + a3);
}

// y = (x - mean) * rstd * w + b, mean and variance (biased) of the row, rstd = 1 / sqrt(var + eps); w, b may be null
// (1 and 0). The row is read three times (mean, variance, output): it is in L1 after the first.
template <typename T>
VK_INLINE void layernorm_row(const T* x, T* y, const T* w, const T* b, int64_t C, T eps, T* mean_out, T* rstd_out) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  const T inv_C = static_cast<T>(1) / static_cast<T>(C);
  V acc = sum_row_vectors<T>(full, [&](int64_t j) { return load(x + j); });
  if (tail) acc += load_partial(x + full, tail);
  const T mean = hsum<T>(acc) * inv_C;
  const V vmean = splat(mean);
  acc = sum_row_vectors<T>(full, [&](int64_t j) { const V d = load(x + j) - vmean; return d * d; });
  if (tail) { V d = load_partial(x + full, tail) - vmean; for (int64_t l = tail; l < L; ++l) d[l] = 0; acc += d * d; }
  const T rstd = static_cast<T>(1) / std::sqrt(hsum<T>(acc) * inv_C + eps);
  const V vrstd = splat(rstd);
  auto out = [&](int64_t j, V xv) {
    V v = (xv - vmean) * vrstd;
    if (w != nullptr) v *= load(w + j);
    if (b != nullptr) v += load(b + j);
    return v;
  };
  for (int64_t j = 0; j < full; j += L) store(y + j, out(j, load(x + j)));
  if (tail) {
    V v = (load_partial(x + full, tail) - vmean) * vrstd;
    if (w != nullptr) v *= load_partial(w + full, tail);
    if (b != nullptr) v += load_partial(b + full, tail);
    store_partial(y + full, v, tail);
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// Backward of layernorm_row: dx = rstd (g w - mean(g w) - xhat mean(g w xhat)) (+ dx_in if not null), with
// xhat = (x - mean) rstd; adds g xhat into dw_acc and g into db_acc (each may be null). dx may alias g or dx_in.
template <typename T>
VK_INLINE void layernorm_row_backward(const T* g, const T* x, T mean, T rstd, const T* w, int64_t C, const T* dx_in,
                                      T* dx, T* dw_acc, T* db_acc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t full = C / L * L, tail = C - full;
  const V vmean = splat(mean), vrstd = splat(rstd);
  V s1 = V{}, s2 = V{};
  auto first = [&](V gv, V xv, V wv) {  // xhat; accumulates the two row sums
    const V xhat = (xv - vmean) * vrstd;
    const V gw = gv * wv;
    s1 += gw;
    s2 += gw * xhat;
    return xhat;
  };
  const V one = splat(static_cast<T>(1));
  for (int64_t j = 0; j < full; j += L) {
    const V gv = load(g + j);
    const V xhat = first(gv, load(x + j), w ? load(w + j) : one);
    if (dw_acc) store(dw_acc + j, load(dw_acc + j) + gv * xhat);
    if (db_acc) store(db_acc + j, load(db_acc + j) + gv);
  }
  if (tail) {
    const V gv = load_partial(g + full, tail);  // zeros past the tail: they add nothing
    const V xhat = first(gv, load_partial(x + full, tail), w ? load_partial(w + full, tail) : one);
    if (dw_acc) store_partial(dw_acc + full, load_partial(dw_acc + full, tail) + gv * xhat, tail);
    if (db_acc) store_partial(db_acc + full, load_partial(db_acc + full, tail) + gv, tail);
  }
  const V a = splat(hsum<T>(s1) / static_cast<T>(C)), c = splat(hsum<T>(s2) / static_cast<T>(C));
  for (int64_t j = 0; j < full; j += L) {
    const V xhat = (load(x + j) - vmean) * vrstd;
    V d = vrstd * (load(g + j) * (w ? load(w + j) : one) - a - xhat * c);
    if (dx_in) d += load(dx_in + j);
    store(dx + j, d);
  }
  if (tail) {
    const V xhat = (load_partial(x + full, tail) - vmean) * vrstd;
    V d = vrstd * (load_partial(g + full, tail) * (w ? load_partial(w + full, tail) : one) - a - xhat * c);
    if (dx_in) d += load_partial(dx_in + full, tail);
    store_partial(dx + full, d, tail);
  }
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

// One row of C (NV vectors wide): the products summed in four interleaved partial sums over k (k mod 4), added at
// the end. A one-row gemm_tile has only NV accumulator chains, each FMA waiting for the previous one (latency 4-5
// cycles, two FMA pipes: ~8-10 chains keep them busy), so it ran at a fraction of the 6-row tiles' rate; the
// remainder row of an M = 49 product (a 7 x 7 window) cost about as much as a whole 6-row tile (on a 2-core AMD
// Zen 2 the window attention's forward ran 1.5-2% faster with this, its backward 3.5-4.5%).
template <typename T, int NV>
VK_INLINE void gemm_row(int64_t K, const T* A, int64_t a_col, const T* B, int64_t ldb, T* C, const T* C0) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[4][NV];
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[u][v] = V{};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const T a = A[(k + u) * a_col];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[u][v] += a * load(B + (k + u) * ldb + v * L);
    }
  }
  for (; k < K; ++k) {
    const T a = A[k * a_col];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[0][v] += a * load(B + k * ldb + v * L);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V sum = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
    store(C + v * L, C0 != nullptr ? load(C0 + v * L) + sum : sum);
  }
}

template <typename T, int MR, int NV>
VK_INLINE void gemm_columns(int64_t M, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                            T* C, int64_t ldc, const T* C0) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    gemm_tile<T, MR, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, C0 ? C0 + i * ldc : nullptr);
  }
  for (; i < M; ++i) gemm_row<T, NV>(K, A + i * a_row, a_col, B, ldb, C + i * ldc, C0 ? C0 + i * ldc : nullptr);
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
