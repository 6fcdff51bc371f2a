"""Summary statistics every evaluation reports the same way."""

from __future__ import annotations

import math

import torch


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / √n) of the finite values; NaN where undefined
    (no finite value, or the error of a single one)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    values = values[torch.isfinite(values)]
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else math.nan
