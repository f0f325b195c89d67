// Argument checks for the C++ bindings and CPU kernels, in the message style of
// mixkernels/ops/_checks.py: "<op>: <argument> must <rule>, got <value>". Kernel-level ops
// are callable directly (torch.ops.mixkernels_C.*), so they check what their loops rely on;
// the public ops have already validated with friendlier messages.
//   MK_CHECK_ARG       -> c10::ValueError (Python ValueError)
//   MK_CHECK_ARG_TYPE  -> c10::TypeError (Python TypeError)
// `rule` and `got` are one printable value each; compose with c10::str(...) (built only on failure).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#define MK_CHECK_ARG(cond, op, name, rule, got) TORCH_CHECK_VALUE(cond, op, ": ", name, " must ", rule, ", got ", got)
#define MK_CHECK_ARG_TYPE(cond, op, name, rule, got) TORCH_CHECK_TYPE(cond, op, ": ", name, " must ", rule, ", got ", got)

namespace mixkernels {

// `t` is a contiguous tensor with `ndim` dims; `layout` names them, e.g. "(B,H,W,C)".
inline void check_contiguous(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* layout) {
  MK_CHECK_ARG(t.dim() == ndim && t.is_contiguous(), op, name, c10::str("be a contiguous ", layout, " tensor"),
               c10::str("shape ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)"));
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  MK_CHECK_ARG_TYPE(t.scalar_type() == want, op, name, c10::str("have dtype ", want), t.scalar_type());
}

// `t` has exactly `want` as its shape.
inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  MK_CHECK_ARG(t.sizes() == want, op, name, c10::str("have shape ", want), t.sizes());
}

}  // namespace mixkernels
