// Per-(window, head) timing of the CPU window attention kernel body (csrc/cpu/window_attention_kernel.h), one
// thread, without torch: what a kernel change does to the forward and backward of one item, free of Python, the
// allocator and (with the per-item minimum) most interference from other work on the machine.
//
// Build and run from the repository root (AVX-512 shown; for AVX2: -mavx2 -mfma -mf16c, VECTOR_BYTES 32, TILE4 0,
// TILE2 6, TILE1 8 -- the values of csrc/cpu/cpu_isa_each.h; TORCH_INC: torch's include directories, for the
// bfloat16 type cpu_simd.h names, e.g. the -I flags of torch.utils.cpp_extension.include_paths()):
//   g++ -O3 -std=c++17 -Wno-psabi -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -mf16c
//       -DVK_CPU_VECTOR_BYTES=64 -DVK_CPU_TILE4_MR=6 -DVK_CPU_TILE2_MR=6 -DVK_CPU_TILE1_MR=8
//       -Icsrc/include -Icsrc/cpu $TORCH_INC benchmarks/cpu/window_attention_items.cpp -o /tmp/wa_items
//   /tmp/wa_items B H heads head_dim reps [probs]   e.g. /tmp/wa_items 4 56 3 32 30   (Swin-T stage 1, batch 4)
// `probs`: the forward saves the softmax and the backward reads it (the training path), instead of the lse.
// Window 7; shift 3 when H > 7. Prints two timings per pass: whole runs over all items with the caches flushed
// before each (the model's case: qkv fresh from the GEMM), and the sum over items of each item's fastest run.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/BFloat16.h>  // cpu_simd.h's bfloat16 loads and stores name the type

#include "window_attention_cpu.h"

#define VK_CPU_X86 1
#define VK_CPU_ISA bench
#include "cpu_simd.h"
#include "window_attention_kernel.h"

using namespace vitkernels;
using namespace vitkernels::cpu;

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s B H heads head_dim reps\n", argv[0]);
    return 2;
  }
  const int64_t B = std::atoi(argv[1]), H = std::atoi(argv[2]), nH = std::atoi(argv[3]), hd = std::atoi(argv[4]);
  const int reps = std::atoi(argv[5]);
  const int64_t ws = 7, shift = H > ws ? 3 : 0;
  WindowAttentionArgs<float, float> a{};
  a.g = WindowGeometry::make(B, H, H, ws, ws, shift, shift);
  a.N = ws * ws;
  a.nH = nH;
  a.hd = hd;
  a.C = nH * hd;
  a.scale = 1.0 / std::sqrt(static_cast<double>(hd));
  a.shifted = shift > 0;
  a.bias_every_token = true;  // the fast Swin block's case
  const int64_t T = B * H * H, C = a.C, N = a.N, NP = round_to_vector(N), W = B * a.g.windows_per_image();
  const int64_t items = W * nH;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> qkv(T * 3 * C), pad(3 * C), out(T * C), grad_out(T * C), grad_qkv(T * 3 * C), lse(items * N);
  std::vector<float> bias_rows(nH * N * NP, -std::numeric_limits<float>::infinity());
  for (auto* v : {&qkv, &pad, &grad_out})
    for (float& x : *v) x = normal(rng);
  for (int64_t h = 0; h < nH; ++h)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) bias_rows[(h * N + i) * NP + j] = 0.02f * normal(rng);
  a.qkv = qkv.data();
  a.pad_row = pad.data();
  a.bias_rows = bias_rows.data();
  const bool save_probs = argc > 6 && std::string(argv[6]) == "probs";
  // the saved softmax: rows of NP values, 64-byte aligned (the kernel's streaming stores need whole aligned vectors)
  float* probs = save_probs ? static_cast<float*>(std::aligned_alloc(64, items * N * NP * sizeof(float))) : nullptr;
  a.lse = save_probs ? nullptr : lse.data();
  a.probs = probs;
  a.out = out.data();
  a.grad_out = grad_out.data();
  a.grad_qkv = grad_qkv.data();
  std::vector<float> scratch(bench::ItemScratch<float>::size(N, hd), 0.0f);
  std::vector<int64_t> tokens(bench::ItemScratch<float>::token_size(N));
  std::vector<float> d_bias(nH * N * NP);
  std::vector<double> d_qkv_bias(nH * 3 * hd);
  std::vector<char> flush(256 << 20, 1);

  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
  auto cold_runs = [&](auto run) {  // median of whole runs over all items, caches flushed before each
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
      for (size_t i = 0; i < flush.size(); i += 64) flush[i]++;
      const auto t0 = clock::now();
      run();
      t.push_back(seconds(t0));
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  auto best_items = [&](auto item) {  // sum over items of each item's fastest run
    std::vector<double> best(items, 1e9);
    for (int r = 0; r < reps; ++r) {
      for (int64_t i = 0; i < items; ++i) {
        const auto t0 = clock::now();
        item(i);
        best[i] = std::min(best[i], seconds(t0));
      }
    }
    double sum = 0;
    for (double b : best) sum += b;
    return sum;
  };
  const double fwd_cold = cold_runs([&] { bench::forward_items(a, 0, items, scratch.data(), tokens.data()); });
  const double bwd_cold = cold_runs([&] {
    bench::backward_items(a, 0, items, scratch.data(), tokens.data(), d_bias.data(), d_qkv_bias.data());
  });
  bench::ItemScratch<float> s(scratch.data(), N, hd, tokens.data());
  const bench::ItemCall<float> call = bench::item_call(a);
  auto next_w = [&](int64_t i) { return i + 1 < items ? (i + 1) / nH : -1; };
  const double fwd_best = best_items([&](int64_t i) {
    bench::forward_item(a, call, i / nH, i % nH, s, next_w(i), (i + 1) % nH);
  });
  const double bwd_best = best_items([&](int64_t i) {
    bench::backward_item(a, call, i / nH, i % nH, s, d_bias.data(), d_qkv_bias.data(), next_w(i), (i + 1) % nH);
  });
  std::printf("B%ld %ldx%ld heads %ld head_dim %ld: %ld items%s\n", (long)B, (long)H, (long)H, (long)nH, (long)hd,
              (long)items, save_probs ? ", softmax saved" : "");
  std::free(probs);
  std::printf("  cold caches, median whole run: forward %.3f ms (%.2f us/item), backward %.3f ms (%.2f us/item)\n",
              fwd_cold * 1e3, fwd_cold / items * 1e6, bwd_cold * 1e3, bwd_cold / items * 1e6);
  std::printf("  per-item minimum, summed:      forward %.3f ms (%.2f us/item), backward %.3f ms (%.2f us/item)\n",
              fwd_best * 1e3, fwd_best / items * 1e6, bwd_best * 1e3, bwd_best / items * 1e6);
  return 0;
}
