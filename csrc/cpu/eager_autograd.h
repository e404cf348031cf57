// Shared by the native ops' eager twins (`<op>_eager`: the op recorded for autograd by a C++ autograd Function, see
// csrc/ops.cpp): when a call records a graph, and the guard their backwards call the backward op under.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>

#include <optional>

namespace vitkernels {
namespace cpu {

inline bool requires_grad_of(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad_of(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// Whether autograd records a call on these tensors (absent optionals allowed): grad mode on and one requires grad.
template <typename... Ts>
bool records_autograd(const Ts&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad_of(tensors) || ...);
}

// Below autograd (the dispatcher goes straight to the kernel), except under create_graph: there the backward op's
// registered autograd runs and records the node that refuses a second-order gradient, as the op's Python backward
// (vitkernels/ops/_library.py refuse_double_backward) does.
class BelowAutogradUnlessCreatingGraph {
 public:
  BelowAutogradUnlessCreatingGraph() {
    if (!at::GradMode::is_enabled()) below_.emplace();
  }

 private:
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_;
};

}  // namespace cpu
}  // namespace vitkernels
