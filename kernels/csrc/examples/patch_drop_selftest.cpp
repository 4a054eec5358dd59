// Standalone check of the C++ library (built by CMakeLists.txt, run by ctest):
// gather/restore on random inputs against ATen's own indexing.
#include <cstdio>

#include "patch_drop.h"

int main() {
  const int64_t B = 3, N = 7, K = 4, D = 5;
  at::manual_seed(0);
  at::Tensor x = at::randn({B, N, D});
  at::Tensor ids_shuffle = at::argsort(at::rand({B, N}), /*dim=*/int64_t{1});
  at::Tensor ids_restore = at::argsort(ids_shuffle, /*dim=*/int64_t{1});
  at::Tensor ids_keep = ids_shuffle.narrow(1, 0, K).contiguous();

  at::Tensor kept = mcr::gather_tokens_cpu(x, ids_keep);
  at::Tensor expected = at::take_along_dim(x, ids_keep.unsqueeze(-1), 1);
  bool ok = at::equal(kept, expected);

  at::Tensor mask_token = at::randn({D});
  at::Tensor full = mcr::restore_tokens_cpu(kept, ids_restore, mask_token);
  at::Tensor dropped = (ids_restore >= K).unsqueeze(-1);
  ok = ok && at::equal(at::where(dropped, mask_token.expand_as(x), x), full);

  std::printf("mcr_kernels C++ self-test: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
