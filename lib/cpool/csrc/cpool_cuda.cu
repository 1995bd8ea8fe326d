// Corner pooling: CUDA kernels for torch.ops.cpool.pool_forward / pool_backward (defined in cpool.cpp).
//
// Each line (a column for top/bottom, a row for left/right) is scanned by one thread with exactly the CPU kernel's
// arithmetic: a value v replaces the running maximum m when v >= m or v is NaN; the backward walks the line in reverse
// scan order and gives each argmax (x == out, or x NaN) the sum of grad_out over its run, added in the same order as
// on the CPU (in float for the 16-bit types). So the forward equals the CPU kernel's bit for bit, and so does the
// backward whenever the CPU kernel also sums sequentially (its float row tiles do: same order).
//
// The kernels are memory-bound; what matters is that every warp-wide load or store touches whole cache lines and
// that enough loads are in flight:
// - Top/bottom: adjacent threads take adjacent columns, so each step of the scan is one coalesced access per warp;
//   each thread loads kBatch steps ahead before scanning them.
// - Left/right: one thread per row would make a warp touch 32 rows, 32 cache lines per access. Instead each warp
//   owns 32 rows and walks them in 32 x 32 tiles: the warp loads a tile row by row (coalesced, 32 independent loads
//   in flight) into shared memory, each lane scans its own row of the tile, and the warp stores the tile row by row.
//   The shared tile has 33 columns so that the lanes' row reads fall in distinct banks.
// Indices are int64 throughout; grids use only gridDim.x (up to 2^31 - 1 blocks).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "cpool.h"

namespace cpool {
namespace {

constexpr int kThreads = 256;  // top/bottom: threads per block
constexpr int kBatch = 8;      // top/bottom: loads issued before the scan steps that use them
constexpr int kTile = 32;      // left/right: rows per warp and columns per tile (one per lane)

template <typename acc_t>
__device__ __forceinline__ bool replaces(acc_t v, acc_t running) {
  return v >= running || v != v;
}

// One gradient step of the backward walk, the CPU kernel's `gradient_step`: returns grad_in, updates sum.
template <typename acc_t>
__device__ __forceinline__ acc_t gradient_step(acc_t& sum, acc_t x, acc_t o, acc_t g) {
  const bool is_argmax = x == o || x != x;
  const acc_t t = sum + g;
  sum = is_argmax ? acc_t(0) : t;
  return is_argmax ? t : acc_t(0);
}

// ---------------------------------------------------------------------------------------------------------------
// Top / bottom. Column l (of planes * W) starts (first element in scan order) at origin, element k at
// origin + k * elem_stride.

struct Columns {
  int64_t count, W, plane_size, start, elem_stride, len;

  __device__ int64_t origin(int64_t l) const { return (l / W) * plane_size + l % W + start; }
};

Columns make_columns(const at::Tensor& x, int64_t direction) {
  const int64_t H = x.size(2), W = x.size(3);
  const bool reverse = is_reverse(direction);
  return Columns{x.size(0) * x.size(1) * W, W, H * W, reverse ? (H - 1) * W : 0, reverse ? -W : W, H};
}

template <typename scalar_t>
__global__ void column_forward_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, Columns cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= cols.count) return;
  const int64_t base = cols.origin(l);
  acc_t running = static_cast<acc_t>(-INFINITY);  // any first value replaces it, as the CPU's out[0] = in[0]
  for (int64_t k0 = 0; k0 < cols.len; k0 += kBatch) {
    scalar_t v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (k0 + i < cols.len) v[i] = in[base + (k0 + i) * cols.elem_stride];
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (k0 + i < cols.len) {
        const acc_t value = static_cast<acc_t>(v[i]);
        if (replaces(value, running)) running = value;
        out[base + (k0 + i) * cols.elem_stride] = static_cast<scalar_t>(running);
      }
    }
  }
}

template <typename scalar_t>
__global__ void column_backward_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ out,
                                       const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_in,
                                       Columns cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= cols.count) return;
  // the backward walks the column in reverse scan order: step s is scan element len - 1 - s
  const int64_t last = cols.origin(l) + (cols.len - 1) * cols.elem_stride;
  acc_t sum = 0;
  for (int64_t s0 = 0; s0 < cols.len; s0 += kBatch) {
    scalar_t x[kBatch], o[kBatch], g[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (s0 + i < cols.len) {
        const int64_t j = last - (s0 + i) * cols.elem_stride;
        x[i] = in[j];
        o[i] = out[j];
        g[i] = grad_out[j];
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (s0 + i < cols.len) {
        const acc_t gi = gradient_step(sum, static_cast<acc_t>(x[i]), static_cast<acc_t>(o[i]),
                                       static_cast<acc_t>(g[i]));
        grad_in[last - (s0 + i) * cols.elem_stride] = static_cast<scalar_t>(gi);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Left / right. Rows of length W, row r at r * W. A walk visits the columns from the start column `first` in
// direction `step` (+1 or -1); the forward walks in scan order, the backward in reverse scan order. Warp w of the
// block owns rows [row0, row0 + 32) with row0 = (blockIdx.x * warps + w) * 32; lane i scans row row0 + i.

// Warps per block: as many as keep the block's shared tiles (`tiles` arrays of 32 x 33 scalars per warp) within
// 40 KiB, at most 4.
template <typename scalar_t, int tiles>
constexpr int warps_per_block() {
  constexpr int per_warp = tiles * kTile * (kTile + 1) * static_cast<int>(sizeof(scalar_t));
  constexpr int fit = 40 * 1024 / per_warp;
  return fit < 1 ? 1 : (fit > 4 ? 4 : fit);
}

struct Rows {
  int64_t count, W, first, step;
};

// Tile columns [t0, t0 + 32) of the walk of the warp's rows move between global and shared memory row by row:
// lane i moves walk column t0 + i of each row, so each row's 32 elements are one coalesced access, and the 32 rows'
// accesses are independent (all in flight at once). fn(tile row r, global index) does the move.
template <typename Fn>
__device__ __forceinline__ void for_tile(const Rows& rows, int64_t row0, int64_t t0, int lane, const Fn& fn) {
  const int64_t t = t0 + lane;
  if (t >= rows.W) return;
  const int64_t column = rows.first + t * rows.step;
  const int64_t n = rows.count - row0 < kTile ? rows.count - row0 : kTile;
#pragma unroll
  for (int r = 0; r < kTile; ++r) {
    if (r < n) fn(r, (row0 + r) * rows.W + column);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, scalar_t (*tile)[kTile + 1],
                                          const Rows& rows, int64_t row0, int64_t t0, int lane) {
  for_tile(rows, row0, t0, lane, [&](int r, int64_t j) { tile[r][lane] = src[j]; });
}

template <typename scalar_t>
__device__ __forceinline__ void store_tile(scalar_t* __restrict__ dst, scalar_t (*tile)[kTile + 1],
                                           const Rows& rows, int64_t row0, int64_t t0, int lane) {
  for_tile(rows, row0, t0, lane, [&](int r, int64_t j) { dst[j] = tile[r][lane]; });
}

template <typename scalar_t>
__global__ void row_forward_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, Rows rows) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWarps = warps_per_block<scalar_t, 1>();
  __shared__ scalar_t tiles[kWarps][kTile][kTile + 1];
  scalar_t(*tile)[kTile + 1] = tiles[threadIdx.y];
  const int lane = threadIdx.x;
  const int64_t row0 = (blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.y) * kTile;
  if (row0 >= rows.count) return;  // the whole warp leaves together
  acc_t running = static_cast<acc_t>(-INFINITY);
  for (int64_t t0 = 0; t0 < rows.W; t0 += kTile) {
    load_tile(in, tile, rows, row0, t0, lane);
    __syncwarp();
    const int n = rows.W - t0 < kTile ? static_cast<int>(rows.W - t0) : kTile;
    if (row0 + lane < rows.count) {
      for (int i = 0; i < n; ++i) {
        const acc_t value = static_cast<acc_t>(tile[lane][i]);
        if (replaces(value, running)) running = value;
        tile[lane][i] = static_cast<scalar_t>(running);
      }
    }
    __syncwarp();
    store_tile(out, tile, rows, row0, t0, lane);
    __syncwarp();  // the next tile's loads overwrite this one
  }
}

template <typename scalar_t>
__global__ void row_backward_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ out,
                                    const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_in,
                                    Rows rows) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWarps = warps_per_block<scalar_t, 3>();
  __shared__ scalar_t x_tiles[kWarps][kTile][kTile + 1], o_tiles[kWarps][kTile][kTile + 1],
      g_tiles[kWarps][kTile][kTile + 1];
  scalar_t(*x)[kTile + 1] = x_tiles[threadIdx.y];
  scalar_t(*o)[kTile + 1] = o_tiles[threadIdx.y];
  scalar_t(*g)[kTile + 1] = g_tiles[threadIdx.y];
  const int lane = threadIdx.x;
  const int64_t row0 = (blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.y) * kTile;
  if (row0 >= rows.count) return;
  acc_t sum = 0;
  for (int64_t t0 = 0; t0 < rows.W; t0 += kTile) {
    load_tile(in, x, rows, row0, t0, lane);
    load_tile(out, o, rows, row0, t0, lane);
    load_tile(grad_out, g, rows, row0, t0, lane);
    __syncwarp();
    const int n = rows.W - t0 < kTile ? static_cast<int>(rows.W - t0) : kTile;
    if (row0 + lane < rows.count) {
      for (int i = 0; i < n; ++i) {
        g[lane][i] = static_cast<scalar_t>(gradient_step(sum, static_cast<acc_t>(x[lane][i]),
                                                         static_cast<acc_t>(o[lane][i]),
                                                         static_cast<acc_t>(g[lane][i])));
      }
    }
    __syncwarp();
    store_tile(grad_in, g, rows, row0, t0, lane);
    __syncwarp();
  }
}

// Forward walks rows in scan order (left: from column W - 1 down), the backward in the reverse order.
Rows make_rows(const at::Tensor& x, int64_t direction, bool backward) {
  const int64_t W = x.size(3);
  const bool from_end = is_reverse(direction) != backward;
  return Rows{x.size(0) * x.size(1) * x.size(2), W, from_end ? W - 1 : 0, from_end ? int64_t(-1) : int64_t(1)};
}

unsigned int blocks(int64_t items, int64_t per_block) {
  const int64_t n = (items + per_block - 1) / per_block;
  TORCH_CHECK(n <= 0x7fffffff, "lib/cpool/csrc: tensor too large for one launch (", items, " lines)");
  return static_cast<unsigned int>(n);
}

at::Tensor pool_forward_cuda(const at::Tensor& input, int64_t direction) {
  check_input(input, direction, "pool_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cpool_forward_cuda", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (is_vertical(direction)) {
      const Columns cols = make_columns(x, direction);
      column_forward_kernel<scalar_t><<<blocks(cols.count, kThreads), kThreads, 0, stream>>>(in, o, cols);
    } else {
      constexpr int warps = warps_per_block<scalar_t, 1>();
      const Rows rows = make_rows(x, direction, false);
      row_forward_kernel<scalar_t><<<blocks(rows.count, kTile * warps), dim3(kTile, warps), 0, stream>>>(in, o, rows);
    }
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cpool_backward_cuda", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* out = o.const_data_ptr<scalar_t>();
    const scalar_t* go = g.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
    if (is_vertical(direction)) {
      const Columns cols = make_columns(x, direction);
      column_backward_kernel<scalar_t><<<blocks(cols.count, kThreads), kThreads, 0, stream>>>(in, out, go, gi, cols);
    } else {
      constexpr int warps = warps_per_block<scalar_t, 3>();
      const Rows rows = make_rows(x, direction, true);
      row_backward_kernel<scalar_t><<<blocks(rows.count, kTile * warps), dim3(kTile, warps), 0, stream>>>(
          in, out, go, gi, rows);
    }
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
