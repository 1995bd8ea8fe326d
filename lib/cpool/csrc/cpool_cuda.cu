// Corner pooling: CUDA kernels for torch.ops.cpool.pool_forward / pool_backward (defined in cpool.cpp).
//
// One thread per line (a column for top/bottom, a row for left/right) runs the same scan as the CPU kernel: a value
// v replaces the running maximum m when v >= m or v is NaN; the backward walks the line in reverse scan order and
// gives each argmax (x == out, or x NaN) the sum of grad_out over its run (sums in float for the 16-bit types).
// For top/bottom adjacent threads read adjacent columns, so every step is one coalesced access per warp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cpool.h"

namespace cpool {
namespace {

constexpr int kThreads = 256;

// Line l starts (first element in scan order) at origin(l); element k at origin(l) + k * elem_stride.
struct Lines {
  int64_t count, len, elem_stride, start, H, W;
  bool vertical;

  __device__ int64_t origin(int64_t l) const {
    return vertical ? (l / W) * H * W + l % W + start : l * W + start;
  }
};

Lines make_lines(const at::Tensor& x, int64_t direction) {
  const int64_t planes = x.size(0) * x.size(1), H = x.size(2), W = x.size(3);
  const bool vertical = is_vertical(direction), reverse = is_reverse(direction);
  if (vertical) {
    return Lines{planes * W, H, reverse ? -W : W, reverse ? (H - 1) * W : 0, H, W, true};
  }
  return Lines{planes * H, W, reverse ? int64_t(-1) : int64_t(1), reverse ? W - 1 : 0, H, W, false};
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, Lines lines) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= lines.count) return;
  int64_t j = lines.origin(l);
  acc_t running = static_cast<acc_t>(in[j]);
  out[j] = in[j];
  for (int64_t k = 1; k < lines.len; ++k) {
    j += lines.elem_stride;
    const acc_t v = static_cast<acc_t>(in[j]);
    if (v >= running || v != v) running = v;
    out[j] = static_cast<scalar_t>(running);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ out,
                                const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_in, Lines lines) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= lines.count) return;
  int64_t j = lines.origin(l) + (lines.len - 1) * lines.elem_stride;
  acc_t sum = 0;
  for (int64_t k = lines.len - 1; k >= 0; --k, j -= lines.elem_stride) {
    const acc_t v = static_cast<acc_t>(in[j]);
    const bool is_argmax = v == static_cast<acc_t>(out[j]) || v != v;
    sum += static_cast<acc_t>(grad_out[j]);
    grad_in[j] = static_cast<scalar_t>(is_argmax ? sum : acc_t(0));
    if (is_argmax) sum = 0;
  }
}

unsigned int blocks_for(int64_t count) {
  return static_cast<unsigned int>((count + kThreads - 1) / kThreads);
}

at::Tensor pool_forward_cuda(const at::Tensor& input, int64_t direction) {
  check_input(input, direction, "pool_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const Lines lines = make_lines(x, direction);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cpool_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(lines.count), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), lines);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor pool_backward_cuda(const at::Tensor& input, const at::Tensor& output, const at::Tensor& grad_output,
                              int64_t direction) {
  check_input(input, direction, "pool_backward");
  check_same(input, output, "output", "pool_backward");
  check_same(input, grad_output, "grad_output", "pool_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), o = output.contiguous(), g = grad_output.contiguous();
  at::Tensor grad_in = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return grad_in;
  const Lines lines = make_lines(x, direction);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cpool_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(lines.count), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        grad_in.mutable_data_ptr<scalar_t>(), lines);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpool, CUDA, m) {
  m.impl("pool_forward", &pool_forward_cuda);
  m.impl("pool_backward", &pool_backward_cuda);
}

}  // namespace cpool
