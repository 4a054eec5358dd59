"""Triton kernels of mcr_kernels, one file per op; CPU tensors run them under TRITON_INTERPRET=1."""
