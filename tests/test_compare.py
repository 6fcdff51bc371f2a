"""`r2d3ray compare` end to end on the smallest budget: real Ray, Serve, Ray Train with one CPU worker,
DeepSpeed and MLflow, a tiny untrained generator, 2 methods x 2 seeds x 1 epoch, then the held-out
evaluation, the table, the figures, and a re-run that trains nothing."""

from __future__ import annotations

import json

import mlflow
import pytest
import ray
import yaml

from r2d3ray import compare
from r2d3ray.cli import main
from r2d3ray.models.tiny import TinySplatGenerator

pytestmark = pytest.mark.slow

APP = "test_compare_rewards"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = root / "tiny"
    TinySplatGenerator.from_config({"resolution": 16, "num_layers": 1, "attention_head_dim": 16}).save_pretrained(model)
    app = {"app_name": APP, "http": {"enabled": False},
           "deployments": [{"name": "color_match", "reward": "color_match", "num_cpus": 0}]}
    (root / "rewards.yaml").write_text(yaml.safe_dump(app))
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}})
    yield root, model
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def compare_args(workspace) -> list[str]:
    root, model = workspace
    settings = [f"output_dir={root / 'out'}", f"model.path={model}", f"rewards.app_name={APP}",
                f"rewards.app_config={root / 'rewards.yaml'}", "rewards.terms=[{name: color_match, weight: 1.0}]",
                "sampling.num_steps=4", "sampling.batch_size=2", "render.size=16",
                "algorithm.grpo.group_size=2", "algorithm.nabla.trajectories=fresh",
                "training.gradient_accumulation_steps=2", "training.micro_batch_size=2",
                # one Train worker: half the processes to start per run, on two busy cores
                "training.num_workers=1"]
    return ["compare", "--config", "configs/toy.yaml", "--methods", "nabla,grpo", "--seeds", "2", "--epochs", "1",
            "--out", str(root / "cmp"), *[a for s in settings for a in ("--set", s)]]


def test_compare_trains_evaluates_reports_and_a_rerun_skips_finished_runs(workspace, capsys, monkeypatch):
    root, _ = workspace
    out = root / "cmp"
    assert main(compare_args(workspace)) == 0
    printed = capsys.readouterr().out

    # One MLflow experiment holding the 4 training runs, named compare-<method>-seed<k>-<date>.
    summary = json.loads((out / "compare_summary.json").read_text())
    mlflow.set_tracking_uri(summary["tracking_uri"])
    experiment = mlflow.get_experiment_by_name(summary["experiment"])
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    names = sorted(r.info.run_name for r in runs)
    date = summary["date"]
    assert names == sorted(f"compare-{m}-seed{k}-{date}" for m in ("nabla", "grpo") for k in (0, 1))
    assert summary["experiment"] == f"compare-{date}"
    # The metrics every comparison reads have the same names in every run, the held-out ones included.
    shared = {"reward/mean", "reward/color_match", "loss", "epoch", "global_step", "lr", "samples_per_second",
              "time/sample", "eval/reward", "eval/reward_gain", "eval/silhouette_iou", "eval/color_accuracy",
              "eval/diversity", "eval/prior_kid", "eval/headroom_closed"}
    for run in runs:
        assert shared <= set(run.data.metrics), (run.info.run_name, shared - set(run.data.metrics))
        assert run.data.params["sampling.batch_size"] == "2" and run.data.params["training.epochs"] == "1"
    eval_names = {frozenset(k for k in r.data.metrics if k.startswith("eval/")) for r in runs}
    assert len(eval_names) == 1
    # eval/* sits at step 0 (the base model) and at the run's final optimizer step.
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "eval/silhouette_iou")
    assert sorted(m.step for m in history) == [0, 1]

    # The same budget: 2 trajectories and one optimizer step per epoch, for every method.
    setting = summary["setting"]
    assert (setting["trajectories_per_epoch_per_worker"], setting["optimizer_steps_per_epoch"]) == (2, 1)
    assert {r["points"][-1]["step"] for r in summary["runs"].values()} == {1}

    # Per method: the numbers, each with its standard error over the 2 seeds.
    for method in ("nabla", "grpo"):
        values = summary["methods"][method]
        assert values["num_seeds"] == 2
        for key in ("reward_gain", "headroom_closed", "silhouette_iou", "color_accuracy", "diversity", "prior_kid",
                    "wall_time_s"):
            assert values[key]["mean"] is not None and values[key]["se"] is not None, (method, key)
        assert values["wall_time_s"]["mean"] > 0
    assert summary["base"]["reward"]["se"] > 0 and summary["reward_ground_truth"] > summary["base"]["reward"]["mean"]

    # The table, the figures and the report are written, and the table is printed.
    table = (out / "compare.md").read_text()
    assert "| nabla |" in table and "| grpo |" in table and "| base |" in table and " ± " in table
    assert "| nabla |" in printed and str(out / "compare_curves.png") in printed
    for name in ("compare_curves.png", "before_after.png", "report/index.html"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "report" / "figures" / "grid_000.png").is_file()

    # A re-run trains nothing (the finished runs are skipped) and evaluates nothing again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("r2d3ray.train.launch.launch", no_training)
    monkeypatch.setattr(compare, "evaluate_runs", no_training)
    assert main(compare_args(workspace)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 4
    assert len(mlflow.search_runs([experiment.experiment_id], output_format="list")) == 4
    assert json.loads((out / "compare_summary.json").read_text())["methods"] == summary["methods"]

    # Another setting in the same --out is refused before anything trains.
    assert main([*compare_args(workspace), "--set", "training.lr=0.5"]) == 2
    assert "holds a comparison of another setting (training.lr" in capsys.readouterr().err


def test_bad_methods_and_budgets_are_clear_errors(capsys):
    assert main(["compare", "--methods", "nabla,ppo"]) == 2
    assert "unknown ppo; choose from nabla,nft,grpo,reward_backprop" in capsys.readouterr().err
    # GRPO's groups of 3 cannot fill a batch of 4: its runs would sample 3 trajectories, the others 4.
    with pytest.raises(compare.CompareError, match="would not share one budget"):
        one_per_step = ["algorithm.grpo.group_size=3", "training.gradient_accumulation_steps=1",
                        "training.micro_batch_size=1"]
        compare.plan_runs(compare.base_config("configs/toy.yaml", one_per_step, 1), ["nabla", "grpo"], 1, "today", "x")


def test_default_setting_is_the_critic_with_the_default_budget():
    base = compare.base_config(None, [], None)
    assert [t.name for t in base.rewards.terms] == ["tiny_critic"]
    assert base.training.epochs == compare.DEFAULT_EPOCHS
    # One checkpoint per evaluation point, all kept.
    assert base.training.checkpoint_every * compare.EVAL_POINTS >= base.training.epochs
    assert base.training.checkpoints_to_keep == compare.EVAL_POINTS
    runs = compare.plan_runs(base, list(compare.METHODS), 2, "20261130-000000", "compare-x")
    assert len({(r.cfg.samples_per_epoch(), r.cfg.optimizer_steps_per_epoch()) for r in runs}) == 1
    assert {r.cfg.name for r in runs} >= {"compare-nabla-seed0-20261130-000000", "compare-grpo-seed1-20261130-000000"}
