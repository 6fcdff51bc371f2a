"""Which sampling steps of a trajectory an algorithm trains on.

Step indices count sampler steps: index ``i`` is the transition ``x_{t_i} -> x_{t_{i+1}}`` made by
the ``i``-th call of the sampler, so ``num_steps - 1`` is the last (final, terminal) transition.
Every function returns one row of indices per sample, ``(B, num_train)`` int64, because each
sample draws its own steps (the references draw per-sample permutations too, but their trainers only
handle a batch of 1 correctly: Nabla-R2D3 builds the timestep tensor for one sample).
"""

from __future__ import annotations

import torch


def num_train_steps(num_steps: int, timestep_fraction: float) -> int:
    """``int(num_steps * timestep_fraction)``, at least 1 — both references' count.

    Nabla-R2D3: ``int(20 * 0.4) = 8``; DiffusionNFT: ``int(10 * 0.99) = 9``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    return max(1, int(num_steps * timestep_fraction))


def _check(batch_size: int, num_steps: int, num_train: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= num_train <= num_steps:
        raise ValueError(f"num_train must be in [1, num_steps={num_steps}], got {num_train}")


def stratified_steps(
    batch_size: int, num_steps: int, num_train: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Low-variance stratified pick: the final step first, then one random step per stratum.

    The other ``num_steps - 1`` steps are cut into ``num_train - 1`` contiguous strata of near-equal
    size (sizes differ by at most one), and each sample draws one step uniformly inside each
    stratum, in ascending stratum order. So every stratum is hit, the final step is always column 0,
    and no step repeats.

    Departure from the reference: R2D3 hard-codes 4 strata of 5 steps for
    20 steps and takes repeated rounds over them (``[19, s0, s1, s2, s3, s0', ...]``, final step
    possibly drawn twice); nabla-gfn needs ``num_steps`` divisible by the stratum count. This version
    works for any ``num_steps`` and ``num_train`` and spreads the picks evenly over the trajectory.
    """
    _check(batch_size, num_steps, num_train)
    final = torch.full((batch_size, 1), num_steps - 1, dtype=torch.long)
    if num_train == 1:
        return final
    num_strata = num_train - 1
    # Stratum k covers steps [edges[k], edges[k+1]); num_strata <= num_steps - 1 keeps every size >= 1.
    edges = torch.arange(num_strata + 1, dtype=torch.long) * (num_steps - 1) // num_strata
    sizes = edges[1:] - edges[:-1]  # (num_strata,)
    u = torch.rand(batch_size, num_strata, generator=generator)
    picks = edges[:-1] + (u * sizes).long().clamp(max=sizes - 1)  # (B, num_strata)
    return torch.cat([final, picks], dim=1)


def random_steps(
    batch_size: int,
    num_steps: int,
    num_train: int,
    include_final: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An independent random permutation per sample, truncated to ``num_train`` columns.

    ``include_final=False`` is DiffusionNFT's pick. ``include_final=True`` is
    nabla-gfn's non-stratified pick: the final step first, then a permutation of the others.
    """
    _check(batch_size, num_steps, num_train)
    if include_final:
        others = torch.argsort(torch.rand(batch_size, num_steps - 1, generator=generator), dim=1)
        final = torch.full((batch_size, 1), num_steps - 1, dtype=torch.long)
        return torch.cat([final, others], dim=1)[:, :num_train]
    return torch.argsort(torch.rand(batch_size, num_steps, generator=generator), dim=1)[:, :num_train]
