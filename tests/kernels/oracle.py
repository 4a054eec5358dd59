"""The comparison the oracle tests share: no NaN, and max |actual - expected| within a
per-dtype tolerance relative to max(1, max |expected|)."""


def relative_assert_close(tolerances):
    """assert_close(actual, expected, dtype, what) with tolerances {dtype: relative tolerance}."""

    def assert_close(actual, expected, dtype, what):
        assert not actual.isnan().any(), f"{what} has NaN"
        err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
        assert err <= tolerances[dtype] * scale, f"{what}: max error {err:.3g} > {tolerances[dtype] * scale:.3g}"

    return assert_close
