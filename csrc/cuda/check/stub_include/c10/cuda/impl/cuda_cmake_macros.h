// Compile-only stand-in (tools/compile_gate_cuda.py): a CPU wheel of torch ships c10/cuda/*.h but not this file,
// which CMake generates for CUDA builds; a CUDA build of torch defines C10_CUDA_BUILD_SHARED_LIBS in it.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
