// CPU token gather / scatter and MAE restore, parallel over batch rows.
#include "patch_drop.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cstring>

namespace mcr {

static void check_inputs(const at::Tensor& x, const at::Tensor& ids, int64_t num_tokens) {
  TORCH_CHECK(x.dim() == 3, "x must be [B, N, D], got ", x.dim(), " dims");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0),
              "ids_keep must be [B, K] with B = ", x.size(0), ", got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(!ids.numel() || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < num_tokens),
              "ids_keep has values outside [0, ", num_tokens, ")");
}

at::Tensor gather_tokens_cpu(const at::Tensor& x_in, const at::Tensor& ids_in) {
  check_inputs(x_in, ids_in, x_in.size(1));
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = at::empty({B, K, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const auto* src = static_cast<const char*>(x.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = ids.data_ptr<int64_t>();
  at::parallel_for(0, B * K, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K;
      std::memcpy(dst + r * row_bytes, src + (b * N + idx[r]) * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor scatter_tokens_cpu(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t num_tokens) {
  check_inputs(grad_in, ids_in, num_tokens);
  const auto grad = grad_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  auto out = at::zeros({B, num_tokens, D}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scatter_tokens_cpu", [&] {
    const auto* g = grad.data_ptr<scalar_t>();
    auto* o = out.data_ptr<scalar_t>();
    const int64_t* idx = ids.data_ptr<int64_t>();
    // One batch row per task: duplicate indices within a row accumulate without races.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < K; ++j) {
          scalar_t* dst = o + (b * num_tokens + idx[b * K + j]) * D;
          const scalar_t* src = g + (b * K + j) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
        }
      }
    });
  });
  return out;
}

static void check_restore(const at::Tensor& x, const at::Tensor& ids) {
  TORCH_CHECK(x.dim() == 3, "x must be [B, K, D] or [B, N, D], got ", x.dim(), " dims");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0),
              "ids_restore must be [B, N] with B = ", x.size(0), ", got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids_restore must be int64, got ", ids.scalar_type());
  TORCH_CHECK(!ids.numel() || ids.min().item<int64_t>() >= 0, "ids_restore has negative values");
}

at::Tensor restore_tokens_cpu(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& mask_token) {
  check_restore(x_in, ids_in);
  TORCH_CHECK(mask_token.numel() == x_in.size(2), "mask_token must have D = ", x_in.size(2), " elements");
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto fill = mask_token.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), K = x.size(1), D = x.size(2), N = ids.size(1);
  auto out = at::empty({B, N, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const auto* src = static_cast<const char*>(x.data_ptr());
  const auto* fill_row = static_cast<const char*>(fill.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = ids.data_ptr<int64_t>();
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / N, k = idx[r];
      std::memcpy(dst + r * row_bytes, k < K ? src + (b * K + k) * row_bytes : fill_row, row_bytes);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                                               int64_t num_keep) {
  check_restore(grad_in, ids_in);
  const auto grad = grad_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2), K = num_keep;
  auto grad_x = at::zeros({B, K, D}, grad.options());
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto per_row = at::zeros({B, D}, grad.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "restore_tokens_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* g = grad.data_ptr<scalar_t>();
    auto* gx = grad_x.data_ptr<scalar_t>();
    auto* acc = per_row.data_ptr<acc_t>();
    const int64_t* idx = ids.data_ptr<int64_t>();
    // One batch row per task: kept slots go to grad_x, masked ones to that row's partial sum.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* src = g + (b * N + n) * D;
          const int64_t k = idx[b * N + n];
          if (k < K) {
            scalar_t* dst = gx + (b * K + k) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          } else {
            acc_t* dst = acc + b * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += static_cast<acc_t>(src[d]);
          }
        }
      }
    });
  });
  return {grad_x, per_row.sum(0)};
}

}  // namespace mcr
