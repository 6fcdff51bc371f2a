"""`r2d3ray bench pipeline`: training throughput and where the time goes, rewards served vs in-process.

Runs the same short Nabla-R2D3 job twice on the embedded default (2 Ray Train workers, DeepSpeed
ZeRO-2): once with the rewards on the Serve plane (the product) and once scored inside each worker.
For each it reports samples per second and the per-epoch time split (sample / reward wait / train)
from the run's last epoch, and for the served run the overlap efficiency

    overlap = 1 - (reward wait, served) / (reward compute),

where reward compute is the in-process run's reward time (there the trainer waits for all of it).
1.0 means reward compute hid entirely behind trainer compute; 0 means the two took turns.
Target: with served rewards, reward wait under 10% of step time when reward compute is under the
trainer's compute. Numbers are written to JSON (`--out`); record them in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    m = run.data.metrics  # the last logged value of each metric: the last epoch
    step = m.get("time/sample", 0) + m.get("time/reward_wait", 0) + m.get("time/train", 0)
    return {"samples_per_second": m.get("samples_per_second"), "time_sample": m.get("time/sample"),
            "time_reward_wait": m.get("time/reward_wait"), "time_train": m.get("time/train"), "epoch_time": step,
            "reward_wait_fraction": m.get("time/reward_wait", 0) / step if step else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the last is measured; default 3)")
    parser.add_argument("--quick", action="store_true", help="a smaller job: 8 sampling steps, 32-pixel renders")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for both runs")
    parser.add_argument("--out", default="bench_pipeline.json", help="JSON output path")
    args = parser.parse_args(argv)

    import ray
    import torch

    overrides = [f"training.epochs={args.epochs}", "algorithm.nabla.trajectories=fresh", *args.overrides]
    if args.quick:
        overrides += ["sampling.num_steps=8", "render.size=32"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for served in (False, True):
            results["served" if served else "in_process"] = run_once(served, Path(tmp), overrides)
        ray.shutdown()
    compute = results["in_process"]["time_reward_wait"] or 0.0
    served = results["served"]
    results["overlap_efficiency"] = 1.0 - served["time_reward_wait"] / compute if compute > 0 else None
    results["machine"] = {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                          "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    results["overrides"] = overrides

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
