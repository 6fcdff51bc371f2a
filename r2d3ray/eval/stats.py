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


def paired_differences(samples: list[dict], run: str, metric: str, base: str = "base") -> torch.Tensor:
    """Per (prompt, seed): run ``run``'s ``metric`` minus run ``base``'s, (n,) float64. The samples are
    paired: both runs start every (prompt, seed) from the same noise."""
    reference = {(s["prompt"], s["seed"]): s[metric] for s in samples if s["run"] == base}
    return torch.tensor([s[metric] - reference[(s["prompt"], s["seed"])] for s in samples if s["run"] == run],
                        dtype=torch.float64)
