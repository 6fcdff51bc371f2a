"""`train_loop_per_worker`: what every Ray Train worker runs (docs/contracts.md names what each step hands the next).

It reads like the algorithm; the Ray, DeepSpeed and MLflow plumbing lives in `TrainingRun`, and
each algorithm's collect/update in `r2d3ray.train.updates`.
"""

from __future__ import annotations

from r2d3ray.config import R2D3Config
from r2d3ray.train.run import TrainingRun, local_rank_env
from r2d3ray.train.updates import ALGORITHMS, train_epoch


def train_loop_per_worker(config: dict) -> None:
    local_rank_env()
    cfg = R2D3Config.model_validate(config["run"])
    Algorithm = ALGORITHMS[cfg.algorithm.name]
    run = TrainingRun.start(cfg, Algorithm.micro_steps_per_update(cfg), served=config.get("served_rewards", True))
    algorithm = Algorithm(run)
    # training.epochs trained epochs; with stale trajectories a sampling-only epoch −1 comes first.
    for epoch in run.remaining_epochs(sampling_only_first=algorithm.trains_on_previous_samples):
        samples = train_epoch(run, algorithm)  # sample, then train every micro-batch
        run.end_epoch(epoch, samples)          # checkpoint, MLflow, progress line
    run.finish()
