"""Index arithmetic of the attention kernels that only overflows at sizes no test can allocate:
varlen row offsets past 2**31 elements, and more than 65,535 sequences in one launch.

The offsets are checked through the kernels' own helper (_seq_bounds) in a tiny Triton kernel
(interpreter on CPU) with cu_seqlens values near 2**31 / (H * Dh); nothing that large is
allocated. The launch grid is checked directly against CUDA's axis limits.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mcr_kernels.triton import attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _row_offsets_kernel(CU, OUT, stride_row, BLOCK: tl.constexpr):
    """OUT[b, i] = (start_b + i) * stride_row, computed as the attention kernels do."""
    b = tl.program_id(0)
    start, length = attention._seq_bounds(CU, b)
    offs = tl.arange(0, BLOCK)
    rows = (start + offs) * stride_row
    tl.store(OUT + b * BLOCK + offs, rows, mask=offs < length)


def test_varlen_row_offsets_are_exact_past_int32():
    H, Dh = 12, 64                      # a row stride of 768 elements (packed [total, H, Dh])
    stride = H * Dh
    first = 2 ** 31 // stride - 3       # rows straddling offset 2**31
    cu = torch.tensor([first, first + 5, first + 13, 2 ** 31 - 9], dtype=torch.int32, device=DEVICE)
    out = torch.full((3, 8), -1, dtype=torch.int64, device=DEVICE)
    _row_offsets_kernel[(3,)](cu, out, stride, BLOCK=8)
    for b in range(3):
        start, length = int(cu[b]), min(int(cu[b + 1] - cu[b]), 8)
        expected = [(start + i) * stride for i in range(length)]
        assert out[b, :length].tolist() == expected  # int32 arithmetic would wrap negative
    assert out.max().item() > 2 ** 31  # the test does reach past int32


class _Sizes:
    def __init__(self, B, H):
        self.B, self.H = B, H


@pytest.mark.parametrize("B, H, rows", [(70_000, 16, 128), (3, 70, 2), (1, 1, 1), (65_536 * 4 + 1, 12, 197)])
def test_grid_axes_stay_within_cuda_limits(B, H, rows):
    """Axis 0 holds up to 2**31 - 1 programs, axes 1 and 2 up to 65,535: many sequences must not
    land on a capped axis, and every (row block, batch) pair gets exactly one program."""
    for block, size in (("BLOCK_M", 64), ("BLOCK_N", 32)):
        grid = attention._grid(rows, _Sizes(B, H), block)({block: size})
        assert grid[0] <= 2 ** 31 - 1 and all(g <= 65_535 for g in grid[1:])
        assert grid[0] == triton.cdiv(rows, size) * B and grid[1] == H
