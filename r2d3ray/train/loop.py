"""`train_loop_per_worker`: what every Ray Train worker runs (docs/contracts.md names what each step hands the next).

It reads like the algorithm; the Ray, DeepSpeed and MLflow plumbing lives in `TrainingRun`, and
each algorithm's collect/update in `r2d3ray.train.updates`.
"""

from __future__ import annotations

from r2d3ray.config import R2D3Config
from r2d3ray.train.run import TrainingRun, local_rank_env
from r2d3ray.train.updates import UPDATES


def train_loop_per_worker(config: dict) -> None:
    local_rank_env()
    cfg = R2D3Config.model_validate(config["run"])
    Updates = UPDATES[cfg.algorithm.name]
    run = TrainingRun.start(cfg, Updates.micro_steps_per_update, served=config.get("served_rewards", True))
    algorithm = Updates(run)
    # training.epochs trained epochs; with stale trajectories a sampling-only epoch −1 comes first.
    for epoch in run.remaining_epochs(sampling_only_first=algorithm.trains_on_previous_samples):
        with run.timer("sample"):
            data = algorithm.collect()                     # 1 sample with the current (NFT: old) policy
        samples = 0
        if data is not None:                               #   (None in the sampling-only epoch)
            for batch in algorithm.batches(data):          # 2 micro-batches of transitions / re-noised samples
                with run.timer("train"):
                    algorithm.update(batch)                #   loss -> engine.backward -> engine.step
                samples += len(batch["prompts"]) if isinstance(batch, dict) else len(batch)
        if hasattr(algorithm, "end_epoch"):
            with run.timer("train"):
                algorithm.end_epoch()                      #   (NFT: the old policy follows; Nabla: log sample rewards)
        run.end_epoch(epoch, samples)                      # 3 checkpoint, MLflow, progress line
    run.finish()
