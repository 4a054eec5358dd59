// Token gather / scatter and MAE restore for patch dropping (MAE-style random masking).
// Shapes: x [B, N, D], ids_keep [B, K] int64, out [B, K, D]; any floating dtype.
// Restore: x_kept [B, K, D], ids_restore [B, N] int64, mask_token [D] -> [B, N, D].
#pragma once
#include <ATen/ATen.h>

namespace mcr {

// out[b, j] = x[b, ids_keep[b, j]]
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& ids_keep);
// grad_x[b, ids_keep[b, j]] += grad_out[b, j]; grad_x is [B, num_tokens, D], zeros elsewhere.
at::Tensor scatter_tokens_cpu(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t num_tokens);
// out[b, n] = x_kept[b, ids_restore[b, n]] if ids_restore[b, n] < K else mask_token (in x_kept's dtype)
at::Tensor restore_tokens_cpu(const at::Tensor& x_kept, const at::Tensor& ids_restore, const at::Tensor& mask_token);
// Backward of restore: (grad_x_kept [B, K, D], grad_mask_token [D] in float32, float64 for double grads)
std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& ids_restore,
                                                               int64_t num_keep);

#ifdef MCR_WITH_CUDA
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_keep);
at::Tensor scatter_tokens_cuda(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t num_tokens);
at::Tensor restore_tokens_cuda(const at::Tensor& x_kept, const at::Tensor& ids_restore, const at::Tensor& mask_token);
std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_restore,
                                                                int64_t num_keep);
#endif

}  // namespace mcr
