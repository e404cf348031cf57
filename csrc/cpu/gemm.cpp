// vitkernels' own float32 CPU GEMM, C = A B [+ bias] (gemm.h), Goto / BLIS style: B's columns in blocks of up to
// kMaxNC, K in passes of at most kMaxKC (K split evenly), B's block packed into column panels (by all threads), then
// each thread packs blocks of up to kMaxMC of its rows of A and runs the register tile (gemm_kernel.h) over them.
// Why a GEMM of our own: on a 2-core AMD EPYC Zen 3 (x86 family 25 model 1, AVX2 only) MKL's sgemm and oneDNN's
// ran Swin-T's Linear products at 65-75% of the cores' FMA peak (a loop of independent FMAs: 216-234 GFLOP/s on both
// cores); the packed 6 x 16 tile streams both operands at unit stride whatever their layout, so x W^T, g W and g^T x
// run at one rate.
//
// vitkernels::cpu_gemm(a, b, bias) exposes it (tests, the sanitizer fuzz): it checks everything it indexes.
#include <vitkernels/precompiled.h>  // first: precompiled by setup.py

#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

#define VK_CPU_BODY "gemm_kernel.h"
#include "cpu_isa_each.h"
#undef VK_CPU_BODY

namespace vitkernels {
namespace cpu {
namespace {

// Blocking, in elements: a kc x kNR panel of B (384 x 16 floats, 24 KB) stays in L1 while a kMC x kc block of A
// (144 x 384, 216 KB) sits in L2 (512 KB per core on Zen 2 and 3) and the kc x kMaxNC block of B (3 MB) in L3.
constexpr int64_t kMaxKC = 384;
constexpr int64_t kMaxMC = 144;
constexpr int64_t kMaxNC = 2048;
// Below this many multiply-adds one thread does the product: a parallel region costs more than it saves.
constexpr int64_t kSerialMacs = int64_t(1) << 18;
// A product with a long K and a small C (a Linear's weight gradient g^T x: K = the batch's tokens) is split over K
// instead of C's rows: each thread sums its share of K into its own C (the first thread into C itself), then the
// partial Cs are added. Split over rows, each of K's passes would need the threads to meet twice (B packed by all,
// then the rows), for a few microseconds of work each: 0.70-0.86x MKL's time at Swin-T's weight gradients.
constexpr int64_t kSplitKMin = 4 * kMaxKC;
constexpr int64_t kSplitKMaxC = int64_t(1) << 20;

// Floats of room past a packed A block for gemm_pack_a's whole-vector stores: every instruction set's
// kGemmPackSlack (its vector's lanes) at most.
constexpr int64_t kPackSlack = 16;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A per-thread scratch buffer of at least n floats, 64-byte aligned, kept between calls (the packed blocks are
// reused by every GEMM this thread takes part in: no allocation, and no fresh pages, per call).
float* scratch(int slot, int64_t n) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[3];
  Buffer& buf = buffers[slot];
  if (buf.size < n) {
    std::free(buf.data);
    buf.size = 0;  // a failed allocation must not leave the old size behind a null buffer
    buf.data = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(round_up(n, 16)) * sizeof(float)));
    TORCH_CHECK(buf.data != nullptr, "cpu_gemm: could not allocate ", n * sizeof(float), " bytes of scratch");
    buf.size = n;
  }
  return buf.data;
}

// The epilogue ep (gemm.h) is applied by the last pass over K; its column sums go to chunk_sums, one row of N
// floats per thread's chunk of C's rows (threads x N, zeroed by the caller), instead of ep.col_sums.
template <int MR, int NR, typename PackB, typename PackA, typename Block>
void run_blocked(int64_t M, int64_t N, int64_t K, const float* B, int64_t b_row, int64_t b_col, float* C,
                 int64_t ldc, const float* bias, bool accumulate, int threads, PackB pack_b, PackA pack_a,
                 Block block, const float* A, int64_t a_row, int64_t a_col, const GemmEpilogue& ep,
                 float* chunk_sums) {
  const int64_t k_passes = std::max<int64_t>(1, (K + kMaxKC - 1) / kMaxKC);
  const int64_t kc_max = std::max<int64_t>(1, (K + k_passes - 1) / k_passes);
  const int64_t groups = (M + MR - 1) / MR;  // rows in groups of MR, split evenly between the threads
  const int64_t nc_max = std::min<int64_t>(kMaxNC, round_up(N, NR));
  float* packed_b = scratch(0, kc_max * nc_max);
  for (int64_t j0 = 0; j0 < N; j0 += kMaxNC) {
    const int64_t nc = std::min<int64_t>(kMaxNC, N - j0);
    const int64_t panels = (nc + NR - 1) / NR;
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kc_max) {
      const int64_t kc = std::min<int64_t>(kc_max, K - k0);
      const bool first = k0 == 0, last = k0 + kc >= K;
      const float* b_block = B + k0 * b_row + j0 * b_col;
      auto pack_panels = [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          pack_b(kc, std::min<int64_t>(NR, nc - p * NR), b_block + p * NR * b_col, b_row, b_col,
                 packed_b + p * NR * kc);
        }
      };
      if (threads > 1) at::parallel_for(0, panels, 1, pack_panels);
      else pack_panels(0, panels);
      auto rows_of = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = groups * t / threads * MR, r1 = std::min<int64_t>(M, groups * (t + 1) / threads * MR);
          for (int64_t i0 = r0; i0 < r1; i0 += kMaxMC) {
            const int64_t mc = std::min<int64_t>(kMaxMC, r1 - i0);
            float* packed_a = scratch(1, round_up(mc, MR) * std::max<int64_t>(kc, 1) + kPackSlack);
            pack_a(mc, kc, A + i0 * a_row + k0 * a_col, a_row, a_col, packed_a);
            GemmEpilogue block_ep = ep;  // at this block's origin
            if (ep.side != nullptr) block_ep.side = ep.side + i0 * ep.ld_side + j0;
            block_ep.col_sums = chunk_sums != nullptr ? chunk_sums + t * N + j0 : nullptr;
            block(mc, nc, kc, packed_a, packed_b, C + i0 * ldc + j0, ldc, accumulate || !first,
                  first && bias != nullptr ? bias + j0 : nullptr, last && ep.gelu ? &block_ep : nullptr);
          }
        }
      };
      if (threads > 1) at::parallel_for(0, threads, 1, rows_of);
      else rows_of(0, threads);
      if (K == 0) break;
    }
  }
}

// The product split over K between the threads where kSplitKMin / kSplitKMaxC say and there is no epilogue (it
// needs the whole sum), else run_blocked's split over C's rows (ep and chunk_sums: run_blocked's).
template <int MR, int NR, typename PackB, typename PackA, typename Block>
void run_split(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
               int64_t b_row, int64_t b_col, float* C, int64_t ldc, const float* bias, bool accumulate, int threads,
               PackB pack_b, PackA pack_a, Block block, const GemmEpilogue& ep, float* chunk_sums) {
  if (threads == 1 || K < kSplitKMin || M * N > kSplitKMaxC || ep.gelu) {
    run_blocked<MR, NR>(M, N, K, B, b_row, b_col, C, ldc, bias, accumulate, threads, pack_b, pack_a, block, A, a_row,
                        a_col, ep, chunk_sums);
    return;
  }
  // partial sums of threads 1.. in one buffer of the calling thread, (threads - 1) x M x N
  float* partial = scratch(2, (threads - 1) * M * N);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = K * t / threads, k1 = K * (t + 1) / threads;
      float* c = t == 0 ? C : partial + (t - 1) * M * N;
      run_blocked<MR, NR>(M, N, k1 - k0, B + k0 * b_row, b_row, b_col, c, t == 0 ? ldc : N, t == 0 ? bias : nullptr,
                          t == 0 && accumulate, 1, pack_b, pack_a, block, A + k0 * a_col, a_row, a_col, GemmEpilogue{},
                          nullptr);
    }
  });
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / N), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t t = 1; t < threads; ++t) {
        const float* p = partial + (t - 1) * M * N + i * N;
        float* c = C + i * ldc;
        for (int64_t j = 0; j < N; ++j) c[j] += p[j];
      }
    }
  });
}

}  // namespace

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
              int64_t b_row, int64_t b_col, float* C, int64_t ldc, const float* bias, bool accumulate,
              const GemmEpilogue& epilogue) {
  const bool sums = epilogue.gelu && epilogue.grad && epilogue.col_sums != nullptr;
  if (sums) std::fill(epilogue.col_sums, epilogue.col_sums + std::max<int64_t>(N, 0), 0.0f);
  if (M <= 0 || N <= 0) return;
  // (in double: the product of three sizes may overflow int64 where none of them does)
  const double macs = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(std::max<int64_t>(K, 1));
  const int threads = at::in_parallel_region() || macs < static_cast<double>(kSerialMacs)
                          ? 1
                          : static_cast<int>(std::max<int64_t>(1, at::get_num_threads()));
  // the column sums per thread's chunk of rows (each chunk is one thread's), added in chunk order in double below
  std::vector<float> chunk_sums(sums ? static_cast<size_t>(threads * N) : 0, 0.0f);
  float* chunks = sums ? chunk_sums.data() : nullptr;
#define VK_GEMM_RUN(ns)                                                                                      \
  static_assert(ns::kGemmPackSlack <= kPackSlack, "gemm_pack_a's stores need more room past the block");        \
  run_split<ns::kGemmMR, ns::kGemmNR>(M, N, K, A, a_row, a_col, B, b_row, b_col, C, ldc, bias, accumulate, \
                                      threads, ns::gemm_pack_b, ns::gemm_pack_a, ns::gemm_packed_block, epilogue,  \
                                      chunks)
  switch (selected_isa()) {
#if defined(VK_CPU_X86) && !defined(VK_CPU_NO_AVX512)
    case Isa::kAvx512: VK_GEMM_RUN(avx512); break;
    case Isa::kAvx2: VK_GEMM_RUN(avx2); break;
#elif defined(VK_CPU_X86)
    case Isa::kAvx512:  // never selected without the AVX-512 code (VK_CPU_NO_AVX512)
    case Isa::kAvx2: VK_GEMM_RUN(avx2); break;
#endif
    default: VK_GEMM_RUN(baseline);
  }
#undef VK_GEMM_RUN
  if (sums) {
    for (int64_t j = 0; j < N; ++j) {
      double total = 0.0;
      for (int t = 0; t < threads; ++t) total += static_cast<double>(chunk_sums[t * N + j]);
      epilogue.col_sums[j] = static_cast<float>(total);
    }
  }
}

at::Tensor gemm_f32(const at::Tensor& a_in, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                    const char* op) {
  TORCH_CHECK(a_in.dim() >= 1 && b.dim() == 2, op, ": a must have at least one dimension and b must be 2D, got ",
              a_in.sizes(), " and ", b.sizes());
  TORCH_CHECK(a_in.size(-1) == b.size(0), op, ": a (..., K) and b (K, N) must agree on K, got ", a_in.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a_in.device().is_cpu() && b.device().is_cpu(), op, ": a and b must be CPU tensors");
  TORCH_CHECK(a_in.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op,
              ": a and b must be float32, got ", a_in.scalar_type(), " and ", b.scalar_type());
  const int64_t K = a_in.size(-1), N = b.size(1);
  int64_t M = 1;  // the product of a's leading dims (not numel / K: K may be 0)
  for (int64_t d = 0; d + 1 < a_in.dim(); ++d) M *= a_in.size(d);
  const at::Tensor a = a_in.dim() == 2 ? a_in : a_in.reshape({M, K});  // a 2D operand reads in place, any strides
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be (", N, "), got ", bias->sizes());
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat, op,
                ": bias must be a float32 CPU tensor");
    bias_c = bias->contiguous();
  }
  std::vector<int64_t> shape(a_in.sizes().begin(), a_in.sizes().end() - 1);
  shape.push_back(N);
  at::Tensor c = at::empty(shape, a.options());  // (..., N), contiguous: the 2D product's rows
  // strides as the tensors have them (any: a transposed or expanded view reads in place); with a size-1 dim its
  // stride is never used to step
  gemm_f32(M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1), b.const_data_ptr<float>(), b.stride(0),
           b.stride(1), c.mutable_data_ptr<float>(), N, bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr,
           false);
  return c;
}

namespace {

at::Tensor cpu_gemm_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return gemm_f32(a, b, bias, "cpu_gemm");
}

}  // namespace

TORCH_LIBRARY_IMPL(vitkernels, CPU, m) {
  m.impl("cpu_gemm", &cpu_gemm_op);
}

}  // namespace cpu
}  // namespace vitkernels
