"""`r2d3ray bench pipeline`: training throughput and where the time goes, rewards served vs in-process.

Runs the same short Nabla-R2D3 job twice on the embedded default (2 Ray Train workers, DeepSpeed
ZeRO-2): once with the rewards on the Serve plane (the product) and once scored inside each worker.
For each it reports samples per second and the per-epoch time split (sample / reward wait / train),
averaged over the epochs after the first, and for the served run the overlap efficiency

    overlap = 1 - (reward wait, served) / (reward compute),

where reward compute is the in-process run's reward time (there the trainer waits for all of it).
1.0 means reward compute hid entirely behind trainer compute; 0 means the two took turns.
Target: with served rewards, reward wait under 10% of step time when reward compute is under the
trainer's compute. Numbers are written to JSON (`--out`); record them in benchmarks/README.md.

The embedded rewards take about a millisecond, too little for the overlap to show. `--reward-ms MS`
makes every reward request take MS milliseconds longer (`DelayedReward` below: the same reward,
values and gradients, after a sleep), standing in for a learned reward on its own accelerator,
HPSv2 on a reward GPU: the time passes on the reward's device, not on the trainer's cores. (A
compute-bound CPU reward would instead take the cores of this 2-core machine from the two
trainer workers, and the benchmark would measure that contention, not the overlap.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from r2d3ray.rewards import RewardModel, register_reward  # noqa: E402
from r2d3ray.rewards.registry import build_reward  # noqa: E402


@register_reward("delayed")
class DelayedReward(RewardModel):
    """The reward `inner` (built with `inner_kwargs`), each request `delay_ms` longer: a costly reward."""

    name = "delayed"

    def __init__(self, inner: str, delay_ms: float, inner_kwargs: dict | None = None):
        super().__init__()
        self.inner = build_reward(inner, **(inner_kwargs or {}))
        self.needs, self.grad_extras, self.delay_s = self.inner.needs, self.inner.grad_extras, delay_ms / 1e3

    def forward(self, images, prompts, extras):
        time.sleep(self.delay_s)  # the reward's device is busy; this process's cores are not
        return self.inner(images, prompts, extras)


def delayed_app_config(app_config: Path, delay_ms: float, replicas: int, out: Path) -> Path:
    """A copy of the reward app config at `app_config` whose every reward is `DelayedReward`,
    with `replicas` replicas each."""
    app = yaml.safe_load(app_config.read_text())
    for deployment in app["deployments"]:
        deployment["kwargs"] = {"inner": deployment["reward"], "delay_ms": delay_ms,
                                "inner_kwargs": deployment.get("kwargs") or {}}
        deployment["reward"] = "bench_pipeline:delayed"  # the replica imports this file for it
        deployment["num_replicas"] = replicas
        # As configs/rewards_diffsplat.yaml's GPU rewards: wait briefly so that the workers' requests
        # merge into one batch, which on an accelerator costs about what one request does.
        deployment["batch_wait_timeout_s"] = 0.01
    out.write_text(yaml.safe_dump(app))
    return out


def run_once(served: bool, workdir: Path, overrides: list[str]) -> dict:
    import mlflow

    from r2d3ray.config import load_config
    from r2d3ray.train.launch import launch

    name = "bench-served" if served else "bench-inprocess"
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"name={name}", f"output_dir={workdir}", *overrides])
    launch(cfg, served_rewards=served)
    mlflow.set_tracking_uri(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'", output_format="list")
    client = mlflow.MlflowClient()

    def mean_after_first_epoch(key: str) -> float | None:
        # Per-epoch metrics are logged once per epoch (step = trained epochs done); the first epoch
        # (warm-up: first Serve calls, DeepSpeed set-up) is left out when there are more.
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        values = values[1:] if len(values) > 1 else values
        return sum(values) / len(values) if values else None

    m = {k: mean_after_first_epoch(k) for k in ("samples_per_second", "time/sample", "time/reward_wait", "time/train")}
    m = {k: v for k, v in m.items() if v is not None}
    step = m.get("time/sample", 0) + m.get("time/reward_wait", 0) + m.get("time/train", 0)
    return {"samples_per_second": m.get("samples_per_second"), "time_sample": m.get("time/sample"),
            "time_reward_wait": m.get("time/reward_wait"), "time_train": m.get("time/train"), "epoch_time": step,
            "reward_wait_fraction": m.get("time/reward_wait", 0) / step if step else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (all but the first are measured; default 3)")
    parser.add_argument("--quick", action="store_true", help="a smaller job: 8 sampling steps, 32-pixel renders")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for both runs")
    parser.add_argument("--reward-ms", type=float, default=0.0, metavar="MS",
                        help="make every reward request MS ms longer, a costly reward on its own device "
                             "(default 0: the embedded rewards as they are, about 1 ms)")
    parser.add_argument("--reward-replicas", type=int, default=1, metavar="N",
                        help="with --reward-ms: replicas of each reward (default 1, shared by both workers)")
    parser.add_argument("--out", default="bench_pipeline.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.reward_ms < 0:
        parser.error(f"--reward-ms {args.reward_ms}: must be >= 0")
    if args.reward_replicas < 1:
        parser.error(f"--reward-replicas {args.reward_replicas}: must be >= 1")

    import ray
    import torch

    overrides = [f"training.epochs={args.epochs}", "algorithm.nabla.trajectories=fresh", *args.overrides]
    if args.quick:
        overrides += ["sampling.num_steps=8", "render.size=32"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.reward_ms > 0:
            app_config = delayed_app_config(ROOT / "configs" / "rewards_toy.yaml", args.reward_ms, args.reward_replicas,
                                            Path(tmp) / "rewards_delayed.yaml")
            overrides.append(f"rewards.app_config={app_config}")
            # Train workers and reward replicas import this file for `bench_pipeline:delayed`.
            path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
            ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}})
        for served in (False, True):
            results["served" if served else "in_process"] = run_once(served, Path(tmp), overrides)
        ray.shutdown()
    compute = results["in_process"]["time_reward_wait"] or 0.0
    served = results["served"]
    results["overlap_efficiency"] = 1.0 - served["time_reward_wait"] / compute if compute > 0 else None
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    results["overrides"] = overrides
    results["reward_delay_ms"] = args.reward_ms
    results["reward_replicas"] = args.reward_replicas if args.reward_ms > 0 else 1

    print(f"\n{'rewards':<12}{'samples/s':>10}{'sample s':>10}{'reward wait s':>15}{'train s':>10}{'wait %':>8}")
    for label in ("in_process", "served"):
        r = results[label]
        print(f"{label:<12}{r['samples_per_second']:>10.3f}{r['time_sample']:>10.2f}{r['time_reward_wait']:>15.3f}"
              f"{r['time_train']:>10.2f}{100 * r['reward_wait_fraction']:>7.1f}%")
    if results["overlap_efficiency"] is not None:
        print(f"overlap efficiency (served): {results['overlap_efficiency']:.2f}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
