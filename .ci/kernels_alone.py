"""Run inside a venv holding the mcr-kernels distribution alone (.ci/kernels_alone.sh): its
metadata requires torch and triton only, and every public op runs once (forward and backward)
while transformers, timm, tokenizers, PIL and yaml cannot be imported, from the venv's copy
of mcr_kernels, not the repository's."""
import importlib.metadata
import re
import sys

BLOCKED = ("transformers", "timm", "tokenizers", "PIL", "yaml", "mcr")
for name in BLOCKED:
    sys.modules[name] = None  # `import name` now raises ImportError

requires = importlib.metadata.requires("mcr-kernels") or []
names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requires}
if names - {"torch", "triton"}:
    sys.exit(f"mcr-kernels requires more than torch and triton: {requires}")

import torch  # noqa: E402

import mcr_kernels  # noqa: E402

if not mcr_kernels.__file__.startswith(sys.prefix):
    sys.exit(f"mcr_kernels came from {mcr_kernels.__file__}, not from the venv at {sys.prefix}")


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def backward(out):
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()


x, mask = leaf(2, 5, 8), torch.tensor([[True] * 5, [True, True, True, False, False]])
q, k, v = leaf(2, 2, 5, 8), leaf(2, 2, 5, 8), leaf(2, 2, 5, 8)
packed, indices, cu_seqlens, max_seqlen = mcr_kernels.unpad_input(x.detach(), mask)
ids_keep, ids_restore = mcr_kernels.random_keep_indices(2, 5, 3)
img, txt = leaf(3, 4, 8), leaf(2, 6, 8)
w1, b1, w2, b2 = leaf(6, 8), leaf(6), leaf(4, 6), leaf(4)
head = mcr_kernels.ProjectionHead(8, 4, hidden_dim=6)
RUNS = {
    "random_keep_indices": lambda: ids_keep,
    "gather_tokens": lambda: mcr_kernels.gather_tokens(x, ids_keep),
    "restore_tokens": lambda: mcr_kernels.restore_tokens(leaf(2, 3, 8), ids_restore, leaf(8)),
    "random_masking": lambda: mcr_kernels.random_masking(x, 0.5),
    "flash_attention": lambda: mcr_kernels.flash_attention(q, k, v, key_padding_mask=mask),
    "flash_attention_varlen": lambda: mcr_kernels.flash_attention_varlen(
        leaf(*packed.shape[:1], 2, 4), leaf(*packed.shape[:1], 2, 4), leaf(*packed.shape[:1], 2, 4),
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen),
    "unpad_input": lambda: mcr_kernels.unpad_input(x, mask),
    "pad_input": lambda: mcr_kernels.pad_input(mcr_kernels.unpad_input(x, mask)[0], indices, 2, 5),
    "mba_pool": lambda: mcr_kernels.mba_pool(x, mask, w1, b1, w2, b2),
    "masked_mean": lambda: mcr_kernels.masked_mean(x, mask),
    "infonce_loss": lambda: mcr_kernels.infonce_loss(leaf(4, 8), leaf(4, 8), torch.tensor(10.0)),
    "mba_infonce": lambda: mcr_kernels.mba_infonce(x, mask, x, mask, head, head, torch.tensor(10.0)),
    "ProjectionHead": lambda: head.pool(x, mask),
    "linear_cross_entropy": lambda: mcr_kernels.linear_cross_entropy(leaf(5, 8), leaf(11, 8), leaf(11),
                                                                     torch.tensor([1, 0, -100, 10, 3])),
    "local_matching": lambda: mcr_kernels.local_matching(img, None, txt, None),
    "gelu_mlp": lambda: mcr_kernels.gelu_mlp(x, w1, b1, leaf(8, 6), leaf(8)),
    "layer_norm_linear": lambda: mcr_kernels.layer_norm_linear(x, leaf(8), leaf(8), w1, b1),
    "PatchDropout": lambda: mcr_kernels.PatchDropout(0.5).train()(x),
    "ClipLoss": lambda: mcr_kernels.ClipLoss()(leaf(4, 8), leaf(4, 8), torch.tensor(10.0)),
}
REGISTRY = {"set_backend", "get_backend", "use_backend", "available_backends", "registered_backends"}
missing = set(mcr_kernels.__all__) - REGISTRY - set(RUNS)
if missing:
    sys.exit(f"public ops this check does not run: {sorted(missing)}")
for run in RUNS.values():
    out = run()
    if (out[0] if isinstance(out, tuple) else out).requires_grad:  # not for indices
        backward(out)
backends = {op: mcr_kernels.backend.resolve(op, torch.device("cpu"))[0] for op in mcr_kernels.backend.ops()}
print(f"mcr_kernels {mcr_kernels.__version__} from {mcr_kernels.__file__}: {len(RUNS)} public ops ran "
      f"without {', '.join(BLOCKED)}; requires {requires}; backends {backends}")
