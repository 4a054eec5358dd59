"""What the kernel tests share: the oracle comparison (no NaN, and max |actual - expected| within
a per-dtype tolerance relative to max(1, max |expected|)) and the parametrisation over every
backend an op registers."""
import pytest
import torch

import mcr_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_param(op):
    """pytest params, one per backend `op` registers, skipped where it cannot run on DEVICE."""
    return [pytest.param(b, marks=pytest.mark.skipif(b not in mcr_kernels.available_backends(op, DEVICE),
                                                     reason=f"{b} not available on {DEVICE}"))
            for b in mcr_kernels.registered_backends(op)]


def relative_assert_close(tolerances):
    """assert_close(actual, expected, dtype, what) with tolerances {dtype: relative tolerance}."""

    def assert_close(actual, expected, dtype, what):
        assert not actual.isnan().any(), f"{what} has NaN"
        err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
        assert err <= tolerances[dtype] * scale, f"{what}: max error {err:.3g} > {tolerances[dtype] * scale:.3g}"

    return assert_close
