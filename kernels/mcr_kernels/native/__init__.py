"""`native` backends: the C++/CUDA kernels of the compiled extension mcr_kernels._C (csrc/) as
torch ops. _C is None where the extension was not built."""
try:
    from mcr_kernels import _C
except ImportError:  # running from a source tree that was never built
    _C = None


def native_available(device):
    """Native kernels exist for CPU tensors, and for CUDA tensors when built with CUDA."""
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _C.with_cuda)
