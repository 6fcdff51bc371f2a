"""A worker's checkpoint: everything a resume needs, written by every rank, merged by Ray Train.

Layout of one checkpoint directory: ``deepspeed/`` (the engine: optimizer, LR schedule, ZeRO
partitions), ``worker_state_rank<r>.pt`` (RNG states and Nabla's stale trajectories, per rank),
and from rank 0 the adapters (``lora/`` and its siblings, see r2d3ray/train/adapters.py) and
``state.json`` (trained epochs, optimizer steps, the MLflow run id, the resolved config).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from r2d3ray.models.lora import use_adapter
from r2d3ray.train.adapters import restore_adapters, save_adapters


def save_checkpoint(run, path: Path) -> None:
    """Write this rank's part of ``run``'s state into ``path``."""
    generator = run.pipeline.generator
    run.engine.save_checkpoint(str(path / "deepspeed"), tag="engine", exclude_frozen_parameters=True)
    torch.save({"rng": run.rng.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(),
                # On the CPU: a restarted worker may get another GPU index, or another node.
                "stale": None if run.stale is None else run.stale.to("cpu")},
               path / f"worker_state_rank{run.rank}.pt")
    if run.rank == 0:
        save_adapters(generator, run.cfg, path)
        (path / "state.json").write_text(json.dumps({
            "epoch": run.epoch, "global_step": run.global_step, "mlflow_run_id": run.tracker.run_id,
            "config": run.cfg.model_dump(mode="json"),
        }, indent=1))
    use_adapter(generator.denoiser, "policy")


def restore_checkpoint(run, path: Path) -> str | None:
    """Load ``path`` into ``run`` (this rank's part); returns the MLflow run id it recorded."""
    state = json.loads((path / "state.json").read_text())
    restore_adapters(run.pipeline.generator, run.cfg, path)
    run.engine.load_checkpoint(str(path / "deepspeed"), tag="engine", load_module_strict=False)
    worker = torch.load(path / f"worker_state_rank{run.rank}.pt", weights_only=False)
    run.rng.set_state(worker["rng"])
    torch.set_rng_state(worker["torch"])
    np.random.set_state(worker["numpy"])
    random.setstate(worker["python"])
    run.stale = None if worker["stale"] is None else worker["stale"].to(run.pipeline.generator.device)
    run.epoch, run.global_step = state["epoch"], state["global_step"]
    if run.rank == 0:
        print(f"[r2d3ray] resumed from {path} after {run.epoch} trained epochs", flush=True)
    return state["mlflow_run_id"]
