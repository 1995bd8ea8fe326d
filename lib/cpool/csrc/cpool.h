// Shared by the CPU (cpool.cpp) and CUDA (cpool_cuda.cu) kernels: direction codes and argument checks.
// Semantics and the tie rule are documented in lib/cpool/__init__.py.
#pragma once

#include <ATen/ATen.h>

namespace cpool {

enum Direction : int64_t { kTop = 0, kBottom = 1, kLeft = 2, kRight = 3 };

// Top/Bottom scan along H (dim 2), Left/Right along W (dim 3). Top and Left start at the far end (index size-1).
inline bool is_vertical(int64_t direction) { return direction == kTop || direction == kBottom; }
inline bool is_reverse(int64_t direction) { return direction == kTop || direction == kLeft; }

inline void check_input(const at::Tensor& input, int64_t direction, const char* op) {
  TORCH_CHECK(input.dim() == 4, "lib/cpool/csrc ", op, ": input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "lib/cpool/csrc ", op,
              ": input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(direction >= kTop && direction <= kRight, "lib/cpool/csrc ", op,
              ": direction must be 0 (top), 1 (bottom), 2 (left) or 3 (right), got ", direction);
}

// `other` (the saved output, or grad_output) must match input in shape, dtype and device.
inline void check_same(const at::Tensor& input, const at::Tensor& other, const char* name, const char* op) {
  TORCH_CHECK(other.sizes() == input.sizes(), "lib/cpool/csrc ", op, ": ", name, " shape ", other.sizes(),
              " must equal input shape ", input.sizes());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), "lib/cpool/csrc ", op, ": ", name, " dtype ",
              other.scalar_type(), " must equal input dtype ", input.scalar_type());
  TORCH_CHECK(other.device() == input.device(), "lib/cpool/csrc ", op, ": ", name, " device ", other.device(),
              " must equal input device ", input.device());
}

}  // namespace cpool
