// CPU emulation of the CUDA runtime for the runtime-only kernel headers (csrc/cuda/*.cuh), for
// csrc/cuda/check/emulate_cuda.py: compiled with g++ instead of the real <cuda_runtime.h>, so the kernel bodies run
// on the CPU. A block's threads are fibers of one OS thread, blocks run one after another; __shared__
// arrays are function statics (one block runs at a time). __syncthreads / __syncthreads_or park the fiber until every
// live thread of the block has arrived, __shfl_xor_sync exchanges through a per-warp buffer between two warp
// barriers, so the kernels' synchronisation is exercised as written; a barrier that can never complete (divergent
// __syncthreads, a partial warp in a shuffle) aborts with a message instead of hanging. Deterministic: the fibers of
// a block run round-robin in thread order. Launches `kernel<<<grid, block, smem, stream>>>(args)` are rewritten by
// emulate_cuda.py into `::vk_emu::launch(grid, block, smem, stream, kernel, args)`. Never part of the extension.
//
// Fiber switches: on x86-64 a few instructions of our own (vk_emu_switch below: the callee-saved registers, the
// stack pointer, MXCSR and the x87 control word, as a function call leaves them); elsewhere ucontext. glibc's
// swapcontext also saves and restores the signal mask, a system call per switch: the switches (every barrier and
// shuffle of every thread) made a fifth of the emulation's time system time.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#define VK_EMU_OWN_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>  // fiber switches announced to AddressSanitizer
#define VK_EMU_SWITCH_START(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define VK_EMU_SWITCH_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define VK_EMU_SWITCH_START(save, bottom, size) ((void)0)
#define VK_EMU_SWITCH_FINISH(save, bottom, size) ((void)0)
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned int x, y, z; };
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace vk_emu {

enum Wait { kRunnable = 0, kBlockBarrier = 1, kWarpBarrier = 2, kDone = 3 };

#if VK_EMU_OWN_SWITCH
// A saved context: the stack pointer of a suspended fiber (or of the scheduler), its registers on its stack.
struct Context {
  void* sp = nullptr;
};
#else
using Context = ucontext_t;
#endif

struct Fiber {
  Context ctx;
  void* stack = nullptr;
  uint3 tid{0, 0, 0};
  Wait wait = kRunnable;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping of the switch
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  unsigned int threads = 0, running = 0;
  std::vector<Fiber> fibers;
  std::vector<double> lanes;  // one 8-byte slot per thread for shuffles
  int vote = 0;               // __syncthreads_or
  Context scheduler;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer: the scheduler's stack, learnt on the first switch
  std::size_t scheduler_stack_size = 0;
  std::function<void()> body;
};
inline Launch* current = nullptr;  // the launch in progress (one at a time)
inline cudaError_t last_error = cudaSuccess;
constexpr std::size_t kFiberStack = 1 << 20;

inline void fail(const char* what) {
  std::fprintf(stderr, "vk_emu: %s (block %u,%u,%u thread %u)\n", what, current->block_idx.x, current->block_idx.y,
               current->block_idx.z, current->running);
  std::abort();
}

#if VK_EMU_OWN_SWITCH
// vk_emu_switch(&from, to): pushes the callee-saved registers (rbp, rbx, r12-r15) and MXCSR / the x87 control word,
// saves the stack pointer into *from, loads `to` and pops the same from there: a function call that returns in the
// other context (the caller-saved registers are the compiler's to save, as around any call).
extern "C" void vk_emu_switch(void** from, void* to);
// (In a COMDAT group, as the compiler emits an inline function: every unit that includes this header defines it.)
asm(R"(
  .pushsection .text.vk_emu_switch, "axG", @progbits, vk_emu_switch, comdat
  .p2align 4
  .weak vk_emu_switch
  .hidden vk_emu_switch
  .type vk_emu_switch, @function
vk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size vk_emu_switch, .-vk_emu_switch
  .popsection
)");

inline void switch_context(Context& from, Context& to) { vk_emu_switch(&from.sp, to.sp); }

// A fiber's first switch lands in `entry` on the top of its stack: the frame vk_emu_switch pops (MXCSR and the x87
// control word at their defaults, zero registers), `entry` as the return address, and below it a null return address
// for entry itself, which never returns (its fiber parks for good), so that it starts with the stack alignment of a
// called function.
inline void start_context(Context& ctx, void* stack, std::size_t size, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack) + size;
  top &= ~static_cast<std::uintptr_t>(15);
  auto* slot = reinterpret_cast<std::uint64_t*>(top);
  *--slot = 0;                                           // entry's return address (never used)
  *--slot = reinterpret_cast<std::uint64_t>(entry);      // vk_emu_switch returns here
  for (int r = 0; r < 6; ++r) *--slot = 0;               // rbp, rbx, r12-r15
  *--slot = std::uint64_t{0x037F} << 32 | 0x1F80;        // the x87 control word, MXCSR
  ctx.sp = slot;
}
#else
inline void switch_context(Context& from, Context& to) { swapcontext(&from, &to); }

inline void start_context(Context& ctx, void* stack, std::size_t size, void (*entry)()) {
  getcontext(&ctx);
  ctx.uc_stack.ss_sp = stack;
  ctx.uc_stack.ss_size = size;
  ctx.uc_link = nullptr;
  makecontext(&ctx, entry, 0);
}
#endif

// Parks the running fiber until the scheduler releases it.
inline void park(Wait why) {
  Launch* l = current;
  Fiber& f = l->fibers[l->running];
  f.wait = why;
  // A finished fiber never comes back: no fake-stack slot, so AddressSanitizer releases it.
  VK_EMU_SWITCH_START(why == kDone ? nullptr : &f.fake_stack, l->scheduler_stack, l->scheduler_stack_size);
  switch_context(f.ctx, l->scheduler);
  VK_EMU_SWITCH_FINISH(f.fake_stack, nullptr, nullptr);
}

inline void fiber_entry() {
  VK_EMU_SWITCH_FINISH(nullptr, &current->scheduler_stack, &current->scheduler_stack_size);
  current->body();
  park(kDone);
}

}  // namespace vk_emu

#define threadIdx (::vk_emu::current->fibers[::vk_emu::current->running].tid)
#define blockIdx (::vk_emu::current->block_idx)
#define blockDim (::vk_emu::current->block)
#define gridDim (::vk_emu::current->grid)

inline unsigned int vk_emu_linear_thread() { return ::vk_emu::current->running; }

inline void __syncthreads() { ::vk_emu::park(::vk_emu::kBlockBarrier); }

inline int __syncthreads_or(int predicate) {
  auto* l = ::vk_emu::current;
  __syncthreads();  // the previous vote is read by everyone
  if (vk_emu_linear_thread() == 0) l->vote = 0;
  __syncthreads();
  if (predicate) l->vote = 1;
  __syncthreads();
  return l->vote;
}

template <typename V>
inline V __shfl_xor_sync(unsigned int mask, V value, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(double), "8-byte shuffle slots");
  auto* l = ::vk_emu::current;
  if (mask != 0xffffffffu) ::vk_emu::fail("shuffle with a partial mask (not emulated)");
  const unsigned int t = vk_emu_linear_thread(), warp = t / 32, lane = t % 32;
  std::memcpy(&l->lanes[t], &value, sizeof(V));
  ::vk_emu::park(::vk_emu::kWarpBarrier);
  V out;
  std::memcpy(&out, &l->lanes[warp * 32 + (lane ^ static_cast<unsigned int>(lane_mask))], sizeof(V));
  ::vk_emu::park(::vk_emu::kWarpBarrier);
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::vk_emu::last_error;
  ::vk_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::vk_emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

namespace vk_emu {

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(unsigned int x) { return dim3(x); }
inline dim3 as_dim3(int x) { return dim3(static_cast<unsigned int>(x)); }

// Runs one block: every fiber until it parks, then releases a complete barrier, until all are done.
inline void run_block(Launch& l) {
  for (unsigned int t = 0; t < l.threads; ++t) {
    Fiber& f = l.fibers[t];
    f.wait = kRunnable;
    f.tid = uint3{t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y)};
    start_context(f.ctx, f.stack, kFiberStack, fiber_entry);
  }
  for (;;) {
    for (unsigned int t = 0; t < l.threads; ++t) {
      if (l.fibers[t].wait != kRunnable) continue;
      l.running = t;
      void* fake_stack = nullptr;
      VK_EMU_SWITCH_START(&fake_stack, l.fibers[t].stack, kFiberStack);
      switch_context(l.scheduler, l.fibers[t].ctx);
      VK_EMU_SWITCH_FINISH(fake_stack, nullptr, nullptr);
    }
    // Everyone is parked or done: release whole warps parked at a shuffle, else the whole block at __syncthreads.
    bool released = false, all_done = true, block_ready = true;
    for (unsigned int w = 0; w * 32 < l.threads; ++w) {
      bool warp_ready = true;
      for (unsigned int t = w * 32; t < w * 32 + 32; ++t) warp_ready &= l.fibers[t].wait == kWarpBarrier;
      if (warp_ready) {
        for (unsigned int t = w * 32; t < w * 32 + 32; ++t) l.fibers[t].wait = kRunnable;
        released = true;
      }
    }
    if (released) continue;
    for (const Fiber& f : l.fibers) {
      all_done &= f.wait == kDone;
      block_ready &= f.wait == kBlockBarrier || f.wait == kDone;
    }
    if (all_done) return;
    if (!block_ready) fail("deadlock: threads wait at different barriers (divergent __syncthreads or shuffle)");
    for (Fiber& f : l.fibers)
      if (f.wait == kBlockBarrier) f.wait = kRunnable;
  }
}

// Runs kernel(args...) for every block of the grid.
template <typename GridT, typename BlockT, typename... Params, typename... Args>
void launch(GridT grid_arg, BlockT block_arg, std::size_t dynamic_smem, cudaStream_t, void (*kernel)(Params...),
            Args&&... args) {
  const dim3 grid = as_dim3(grid_arg), block_dim = as_dim3(block_arg);
  const unsigned int threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || threads % 32 != 0 || dynamic_smem != 0 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;  // (partial warps and dynamic shared memory are not emulated)
    return;
  }
  Launch l;
  l.grid = grid;
  l.block = block_dim;
  l.threads = threads;
  l.fibers.resize(threads);
  for (Fiber& f : l.fibers) f.stack = std::malloc(kFiberStack);
  l.lanes.assign(threads, 0.0);
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  l.body = [&] { std::apply(kernel, params); };
  current = &l;
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) {
        l.block_idx = uint3{x, y, z};
        run_block(l);
      }
  current = nullptr;
  for (Fiber& f : l.fibers) std::free(f.stack);
}

}  // namespace vk_emu
