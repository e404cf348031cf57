// A / B timing of two versions of the CPU GEMM's block code (csrc/cpu/gemm_kernel.h: gemm_pack_a, gemm_pack_b,
// gemm_packed_block) on one thread, without torch: the serial part of csrc/cpu/gemm.cpp's run_blocked (same
// blocking), with the caches flushed before every run (the model's case: operands fresh from memory), the two
// versions interleaved run by run. Prints the median time of each, their ratio, the time inside the packs and the
// largest difference between the two results (the products must agree exactly where only the packing changed).
//
// Build from the repository root, OLD_DIR a copy of an older csrc/cpu (e.g. `git show REV:csrc/cpu/gemm_kernel.h`
// and cpu_simd.h into /tmp/old), AVX2 flags as in csrc/cpu/cpu_isa_each.h (TORCH_INC: the -I flags of
// torch.utils.cpp_extension.include_paths(), for the types gemm.h and cpu_simd.h name):
//   g++ -O3 -std=c++17 -Wno-psabi -mavx2 -mfma -mf16c -DVK_CPU_VECTOR_BYTES=32 -DVK_CPU_TILE4_MR=0
//       -DVK_CPU_TILE2_MR=6 -DVK_CPU_TILE1_MR=8 -Icsrc/include -Icsrc/cpu $TORCH_INC
//       '-DOLD_SIMD="/tmp/old/cpu_simd.h"' '-DOLD_GEMM="/tmp/old/gemm_kernel.h"'
//       benchmarks/cpu/gemm_blocks_ab.cpp -o /tmp/gemm_ab
//   /tmp/gemm_ab KIND M N K reps
// KIND: fwd (x W^T: A row-major, B = W^T), dx (g W: both row-major), dw (g^T x: A read transposed); M N K the
// product's (Swin-T b4 stage 1's input gradient of qkv: dx 12544 96 288). Without OLD_*, both sides are this tree's.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>

#include "gemm.h"

#ifndef OLD_SIMD
#define OLD_SIMD "cpu_simd.h"
#define OLD_GEMM "gemm_kernel.h"
#endif

#define VK_CPU_X86 1
#define VK_CPU_ISA old_version
#include OLD_SIMD
#include OLD_GEMM
#undef VK_CPU_ISA
#define VK_CPU_ISA new_version
#include "cpu_simd.h"
#include "gemm_kernel.h"
#undef VK_CPU_ISA

namespace {

float* aligned_floats(int64_t n) {
  return static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((n + 15) / 16 * 16 + 64) * sizeof(float)));
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// gemm.cpp's blocking (kMaxKC, kMaxMC, kMaxNC), one thread; pack_ms accumulates the time in the packs.
template <int MR, int NR, typename PackA, typename PackB, typename Block>
void run_serial(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                int64_t b_row, int64_t b_col, float* C, PackA pack_a, PackB pack_b, Block block, float* packed_a,
                float* packed_b, double& pack_ms) {
  constexpr int64_t kMaxKC = 384, kMaxMC = 144, kMaxNC = 2048;
  const int64_t k_passes = std::max<int64_t>(1, (K + kMaxKC - 1) / kMaxKC);
  const int64_t kc_max = (K + k_passes - 1) / k_passes;
  for (int64_t j0 = 0; j0 < N; j0 += kMaxNC) {
    const int64_t nc = std::min(kMaxNC, N - j0), panels = (nc + NR - 1) / NR;
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t p = 0; p < panels; ++p) {
        pack_b(kc, std::min<int64_t>(NR, nc - p * NR), B + k0 * b_row + (j0 + p * NR) * b_col, b_row, b_col,
               packed_b + p * NR * kc);
      }
      pack_ms += ms_since(t0);
      for (int64_t i0 = 0; i0 < M; i0 += kMaxMC) {
        const int64_t mc = std::min(kMaxMC, M - i0);
        const auto t1 = std::chrono::steady_clock::now();
        pack_a(mc, kc, A + i0 * a_row + k0 * a_col, a_row, a_col, packed_a);
        pack_ms += ms_since(t1);
        block(mc, nc, kc, packed_a, packed_b, C + i0 * N + j0, N, k0 > 0, nullptr, nullptr);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s fwd|dx|dw M N K reps\n", argv[0]);
    return 2;
  }
  const char* kind = argv[1];
  const int64_t M = std::atoll(argv[2]), N = std::atoll(argv[3]), K = std::atoll(argv[4]);
  const int reps = std::max(1, std::atoi(argv[5]));
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  float* A = aligned_floats(M * K);
  float* B = aligned_floats(K * N);
  for (int64_t i = 0; i < M * K; ++i) A[i] = dist(gen);
  for (int64_t i = 0; i < K * N; ++i) B[i] = dist(gen);
  int64_t a_row = K, a_col = 1, b_row = N, b_col = 1;  // dx: g (M x K) and W (K x N), row-major
  if (!std::strcmp(kind, "dw")) {  // A = g^T, g (K x M)
    a_row = 1;
    a_col = M;
  } else if (!std::strcmp(kind, "fwd")) {  // B = W^T, W (N x K)
    b_row = 1;
    b_col = K;
  }
  float* C[2] = {aligned_floats(M * N), aligned_floats(M * N)};
  float* packed_a = aligned_floats(144 * 384 + 64);
  float* packed_b = aligned_floats(384 * 2048 + 64);
  std::vector<char> flush(64 << 20, 1);
  std::vector<double> ms[2];
  double pack_ms[2] = {0.0, 0.0};
  for (int r = 0; r < reps; ++r) {
    for (int v = 0; v < 2; ++v) {
      for (size_t i = 0; i < flush.size(); i += 64) flush[i]++;
      const auto t0 = std::chrono::steady_clock::now();
      if (v == 0) {
        namespace o = vitkernels::cpu::old_version;
        run_serial<o::kGemmMR, o::kGemmNR>(M, N, K, A, a_row, a_col, B, b_row, b_col, C[0], o::gemm_pack_a,
                                           o::gemm_pack_b, o::gemm_packed_block, packed_a, packed_b, pack_ms[0]);
      } else {
        namespace n = vitkernels::cpu::new_version;
        run_serial<n::kGemmMR, n::kGemmNR>(M, N, K, A, a_row, a_col, B, b_row, b_col, C[1], n::gemm_pack_a,
                                           n::gemm_pack_b, n::gemm_packed_block, packed_a, packed_b, pack_ms[1]);
      }
      ms[v].push_back(ms_since(t0));
    }
  }
  double max_diff = 0.0;
  for (int64_t i = 0; i < M * N; ++i) max_diff = std::max(max_diff, static_cast<double>(std::fabs(C[0][i] - C[1][i])));
  const double flop = 2.0 * M * N * K;
  double median[2];
  for (int v = 0; v < 2; ++v) {
    std::sort(ms[v].begin(), ms[v].end());
    median[v] = ms[v][ms[v].size() / 2];
  }
  std::printf("%s M=%lld N=%lld K=%lld: old %.2f ms (%.1f GFLOP/s, packs %.2f) new %.2f ms (%.1f GFLOP/s, packs %.2f)"
              " new/old %.3f max diff %g\n",
              kind, static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K), median[0],
              flop / median[0] / 1e6, pack_ms[0] / reps, median[1], flop / median[1] / 1e6, pack_ms[1] / reps,
              median[1] / median[0], max_diff);
  return max_diff == 0.0 ? 0 : 1;
}
