// Compile-only stand-in (tools/compile_gate_cuda.py): torch's CUDA headers include this CUDA library header, which
// the gate's CUDA toolkit lacks; only the names torch's headers declare with are given. Never linked, never run.
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
