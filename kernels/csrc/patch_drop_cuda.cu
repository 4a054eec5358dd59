// CUDA token gather / scatter and MAE restore: one block per output row, threads stride over D.
#include "patch_drop.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace mcr {
namespace {

template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ ids,
                                   scalar_t* __restrict__ out, int64_t N, int64_t K, int64_t D) {
  const int64_t r = blockIdx.x;  // row of out: b * K + j
  const int64_t b = r / K;
  const scalar_t* src = x + (b * N + ids[r]) * D;
  scalar_t* dst = out + r * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}

template <typename scalar_t>
__global__ void scatter_add_rows_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ ids,
                                        scalar_t* __restrict__ out, int64_t N, int64_t K, int64_t D) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / K;
  const scalar_t* src = grad + r * D;
  scalar_t* dst = out + (b * N + ids[r]) * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) gpuAtomicAdd(dst + d, src[d]);
}

template <typename scalar_t>
__global__ void restore_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ ids,
                                    const scalar_t* __restrict__ fill, scalar_t* __restrict__ out,
                                    int64_t N, int64_t K, int64_t D) {
  const int64_t r = blockIdx.x;  // row of out: b * N + n
  const int64_t b = r / N, k = ids[r];
  const scalar_t* src = k < K ? x + (b * K + k) * D : fill;
  scalar_t* dst = out + r * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[d] = src[d];
}

template <typename scalar_t, typename acc_t>
__global__ void restore_backward_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ ids,
                                        scalar_t* __restrict__ grad_x, acc_t* __restrict__ per_row,
                                        int64_t N, int64_t K, int64_t D) {
  const int64_t r = blockIdx.x;  // row of grad: b * N + n
  const int64_t b = r / N, k = ids[r];
  const scalar_t* src = grad + r * D;
  if (k < K) {
    scalar_t* dst = grad_x + (b * K + k) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) gpuAtomicAdd(dst + d, src[d]);
  } else {
    acc_t* dst = per_row + b * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) gpuAtomicAdd(dst + d, static_cast<acc_t>(src[d]));
  }
}

int threads_for(int64_t D) { return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (D + 31) / 32 * 32))); }

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x_in, const at::Tensor& ids_in) {
  TORCH_CHECK(x_in.dim() == 3 && ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0),
              "gather_tokens_cuda: expected x [B, N, D] and ids_keep [B, K]");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "ids_keep must be int64");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cuda", [&] {
    gather_rows_kernel<scalar_t><<<B * K, threads_for(D), 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), N, K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t num_tokens) {
  TORCH_CHECK(grad_in.dim() == 3 && ids_in.dim() == 2 && ids_in.size(0) == grad_in.size(0),
              "scatter_tokens_cuda: expected grad [B, K, D] and ids_keep [B, K]");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "ids_keep must be int64");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  auto out = at::zeros({B, num_tokens, D}, grad.options());
  if (grad.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scatter_tokens_cuda", [&] {
    scatter_add_rows_kernel<scalar_t><<<B * K, threads_for(D), 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), num_tokens, K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor restore_tokens_cuda(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& mask_token) {
  TORCH_CHECK(x_in.dim() == 3 && ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0),
              "restore_tokens_cuda: expected x_kept [B, K, D] and ids_restore [B, N]");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "ids_restore must be int64");
  TORCH_CHECK(mask_token.numel() == x_in.size(2), "mask_token must have D = ", x_in.size(2), " elements");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto fill = mask_token.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), K = x.size(1), D = x.size(2), N = ids.size(1);
  auto out = at::empty({B, N, D}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "restore_tokens_cuda", [&] {
    restore_rows_kernel<scalar_t><<<B * N, threads_for(D), 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), fill.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        N, K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                                                int64_t num_keep) {
  TORCH_CHECK(grad_in.dim() == 3 && ids_in.dim() == 2 && ids_in.size(0) == grad_in.size(0),
              "restore_tokens_backward_cuda: expected grad [B, N, D] and ids_restore [B, N]");
  TORCH_CHECK(ids_in.scalar_type() == at::kLong, "ids_restore must be int64");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2), K = num_keep;
  auto grad_x = at::zeros({B, K, D}, grad.options());
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto per_row = at::zeros({B, D}, grad.options().dtype(acc_type));
  if (grad.numel() == 0) return {grad_x, per_row.sum(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "restore_tokens_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    restore_backward_kernel<scalar_t, acc_t><<<B * N, threads_for(D), 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(), per_row.data_ptr<acc_t>(),
        N, K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, per_row.sum(0)};
}

}  // namespace mcr
