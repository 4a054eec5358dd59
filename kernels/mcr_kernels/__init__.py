"""mcr_kernels: fused kernels for masked vision-language pretraining, as torch ops.

Every op has a plain PyTorch `reference` backend (the test oracle) and, where written,
`triton` and `native` (C++/CUDA, mcr_kernels._C) backends; see mcr_kernels.backend for
how one is chosen. This package never imports `mcr`; it needs torch (and triton for the
`triton` backend) only.
"""
from mcr_kernels.attention import flash_attention, flash_attention_varlen, pad_input, unpad_input
from mcr_kernels.backend import available_backends, get_backend, registered_backends, set_backend, use_backend
from mcr_kernels.gelu_mlp import gelu_mlp
from mcr_kernels.integrations import ClipLoss, PatchDropout  # noqa: E402  (after the ops they use)
from mcr_kernels.layer_norm_linear import layer_norm_linear
from mcr_kernels.linear_cross_entropy import linear_cross_entropy
from mcr_kernels.local_matching import local_matching
from mcr_kernels.mba import ProjectionHead, infonce_loss, masked_mean, mba_infonce, mba_pool
from mcr_kernels.patch_drop import gather_tokens, random_keep_indices, random_masking, restore_tokens

__version__ = "0.1.0"  # the package version (pyproject.toml reads it)

__all__ = [
    "random_keep_indices", "gather_tokens", "restore_tokens", "random_masking",
    "flash_attention", "flash_attention_varlen", "unpad_input", "pad_input",
    "mba_pool", "masked_mean", "infonce_loss", "mba_infonce", "ProjectionHead", "linear_cross_entropy",
    "local_matching", "gelu_mlp", "layer_norm_linear",
    "set_backend", "get_backend", "use_backend", "available_backends", "registered_backends",
    "PatchDropout", "ClipLoss",
]
