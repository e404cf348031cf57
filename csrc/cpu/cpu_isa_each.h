// Compiles cpu_simd.h and then the file named by VK_CPU_BODY (a quoted include path) once per instruction set:
// AVX-512, AVX2+FMA (x86-64 with GCC or clang) and the baseline, each in its own namespace (avx512, avx2, baseline)
// with its GEMM register tiles; no AVX-512 with VK_CPU_NO_AVX512 (setup.py's sanitized build on a CPU without it,
// whose tests could not run that code: cpu_isa.h then never selects it). Include it once per translation unit.
// Pick one at run time with selected_isa() and VK_CPU_CALL (cpu_isa.h):
//   #define VK_CPU_BODY "my_kernel.h"
//   #include "cpu_isa_each.h"
//   #undef VK_CPU_BODY
// The body must open `namespace vitkernels { namespace cpu { namespace VK_CPU_ISA {` itself and include only
// headers that are safe to re-read per instruction set (other bodies): standard headers belong before this
// include; cpu_simd.h is already there.
// Deliberately no include guard.
#include "cpu_isa.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types in inlined helpers: no ABI crosses a boundary

#if defined(VK_CPU_X86) && !defined(VK_CPU_NO_AVX512)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#endif
#define VK_CPU_ISA avx512
#define VK_CPU_VECTOR_BYTES 64
#define VK_CPU_TILE4_MR 6  // 6 x 4 zmm accumulators + 4 for B: 28 of 32 registers
#define VK_CPU_TILE2_MR 6  // 6 x 2 + 2
#define VK_CPU_TILE1_MR 8  // 8 x 1 + 1
#include "cpu_simd.h"
#include VK_CPU_BODY
#undef VK_CPU_ISA
#undef VK_CPU_VECTOR_BYTES
#undef VK_CPU_TILE4_MR
#undef VK_CPU_TILE2_MR
#undef VK_CPU_TILE1_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // VK_CPU_X86 && !VK_CPU_NO_AVX512

#ifdef VK_CPU_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define VK_CPU_ISA avx2
#define VK_CPU_VECTOR_BYTES 32
#define VK_CPU_TILE4_MR 0  // no 4-wide tiles: 2 x 4 fits 16 ymm registers but measured slower than 6 x 2
#define VK_CPU_TILE2_MR 6  // 6 x 2 ymm accumulators + 2 for B + 1 broadcast: 15 of 16 registers
#define VK_CPU_TILE1_MR 8  // 8 x 1 + 1
#include "cpu_simd.h"
#include VK_CPU_BODY
#undef VK_CPU_ISA
#undef VK_CPU_VECTOR_BYTES
#undef VK_CPU_TILE4_MR
#undef VK_CPU_TILE2_MR
#undef VK_CPU_TILE1_MR
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // VK_CPU_X86

#define VK_CPU_ISA baseline
#define VK_CPU_VECTOR_BYTES 16
#define VK_CPU_TILE4_MR 2  // 2 x 4 xmm accumulators + 4 for B: 12 of 16 registers
#define VK_CPU_TILE2_MR 6  // 6 x 2 + 2
#define VK_CPU_TILE1_MR 8  // 8 x 1 + 1
#include "cpu_simd.h"
#include VK_CPU_BODY
#undef VK_CPU_ISA
#undef VK_CPU_VECTOR_BYTES
#undef VK_CPU_TILE4_MR
#undef VK_CPU_TILE2_MR
#undef VK_CPU_TILE1_MR

#pragma GCC diagnostic pop
