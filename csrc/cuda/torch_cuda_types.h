// torch's scalar types -> the CUDA types the runtime-only kernels (*.cuh) are written for, and typed data pointers
// of tensors in those types; for the torch bindings (*.cpp). Same layouts: c10::Half is __half, c10::BFloat16 is
// __nv_bfloat16.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vitkernels {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
typename CudaType<scalar_t>::type* mptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

}  // namespace vitkernels
