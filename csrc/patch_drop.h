// Token gather / scatter for patch dropping (MAE-style random masking).
// Shapes: x [B, N, D], ids_keep [B, K] int64, out [B, K, D]; any floating dtype.
#pragma once
#include <ATen/ATen.h>

namespace mcr {

// out[b, j] = x[b, ids_keep[b, j]]
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& ids_keep);
// grad_x[b, ids_keep[b, j]] += grad_out[b, j]; grad_x is [B, num_tokens, D], zeros elsewhere.
at::Tensor scatter_tokens_cpu(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t num_tokens);

#ifdef MCR_WITH_CUDA
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep);
at::Tensor scatter_tokens_cuda(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t num_tokens);
#endif

}  // namespace mcr
