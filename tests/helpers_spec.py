"""The SPEC.md tolerance rule (SPEC 3): a value printed with 13 or more significant digits is
checked to rtol 1e-12; one printed with fewer digits to half a unit of its last printed digit."""

from __future__ import annotations

import torch


def spec_tolerance(printed: str) -> tuple[float, float]:
    """(rtol, atol) for a value printed in SPEC.md: rtol 1e-12 at 13+ significant digits,
    otherwise atol = half a unit of the last printed digit."""
    mantissa, _, exponent = printed.strip().lower().partition("e")
    digits = mantissa.lstrip("+-").replace(".", "").lstrip("0")
    if len(digits) >= 13:
        return 1e-12, 0.0
    decimals = len(mantissa.partition(".")[2])
    return 0.0, 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def assert_spec(value: float | torch.Tensor, printed: str) -> None:
    value = float(value)
    expected = float(printed)
    rtol, atol = spec_tolerance(printed)
    tol = atol + rtol * abs(expected)
    assert abs(value - expected) <= tol, (
        f"{value!r} != SPEC {printed} (|diff| {abs(value - expected):.3g} > tol {tol:.3g})")


def equivalent(f: torch.Tensor, ref: torch.Tensor) -> None:
    """The wrapped-model tolerance of SPEC 14.7 and 15.8: |f - ref| <= 1e-5 * max(1, max |ref|)
    elementwise."""
    bound = 1e-5 * max(1.0, float(ref.abs().max()))
    err = float((f - ref).abs().max())
    assert err <= bound, f"max |f - reference| = {err:.3g} > {bound:.3g}"
