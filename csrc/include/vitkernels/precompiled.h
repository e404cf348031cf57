// The torch and standard headers most CPU translation units of vitkernels._C include, first in each of them (not
// csrc/ops.cpp, which needs <Python.h> first), so that setup.py can precompile them once per build: 5-7 s less per
// unit at -O3 (setup.py, precompiled_header_build). Without the precompiled form (another build system, a compiler
// without it, flags that do not match) this is an ordinary header. A unit still includes what it uses itself; this
// list only has to be common, not complete.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
