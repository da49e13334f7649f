"""Tolerances for comparing two computations of the same values in a different order (compiled against eager,
2 ranks against 1, one attention kernel against another), derived from the computation instead of one machine.

A sum of n floating-point terms computed in two different orders differs by at most about ``n * eps * sum |terms|``
(eps: the unit roundoff of the dtype; the classic worst-case bound of recursive summation). Inductor's fused
reductions, a CPU's vector width (AVX2: 8 floats, AVX-512: 16, AMX tiles) and oneDNN's blocking all change that
order, so a tolerance taken from what one machine happened to print fails on another; one of ``n * eps`` relative
to the values' scale holds on every machine. ``n`` is the longest reduction the compared values went through (the
vocabulary for anything downstream of the loss, the hidden size for a layer's output).

    assert_close_rounding(compiled, eager, torch.float32, n=vocab_size)
"""

from __future__ import annotations

import torch


def rounding_tolerance(dtype: torch.dtype, n: int) -> float:
    """``n * eps(dtype)``: the relative difference two summation orders of ``n`` terms may reach."""
    return n * torch.finfo(dtype).eps


def assert_close_rounding(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, n: int,
                          scale: float | None = None, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to the rounding of a length-``n`` reduction in ``dtype``.

    Args:
        dtype: the dtype the computation accumulated in (float32 for fp32 models and for bf16 matmuls, which
            accumulate in float32; bfloat16 for values rounded to bf16 on the way).
        n: the longest reduction behind the values.
        scale: the magnitude the rounding is relative to (default: the largest ``|expected|``); an element near
            zero that came out of a sum of large terms carries the absolute error of that sum, not a relative one.
    """
    rel = rounding_tolerance(dtype, n)
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=msg)
