"""The distributed trainer end to end (issue 6): real Ray, Serve, Ray Train with 2 CPU workers,
DeepSpeed ZeRO-2 and MLflow, on a tiny untrained generator so each run takes seconds of compute.

One local Ray instance serves the whole module. The reward app is deployed by the trainer itself
(and reused by later runs), as a user's `r2d3ray train` does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import yaml

from r2d3ray.config import load_config
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.rewards import RewardModel, register_reward
from r2d3ray.rewards.toy import ColorAgreementReward
from r2d3ray.train.launch import LaunchError, launch, with_absolute_paths

pytestmark = pytest.mark.slow

APP = "test_train_rewards"
ROOT = Path(__file__).resolve().parents[1]


@register_reward("rank_one_nan")
class RankOneNaN(RewardModel):
    """Test-only: color_match, but NaN on every view the rank-1 Train worker scores (in-process)."""

    name = "rank_one_nan"

    def __init__(self):
        super().__init__()
        self.color_match = ColorAgreementReward()

    def forward(self, images, prompts, extras):
        values = self.color_match.forward(images, prompts, extras)  # (B, V)
        # Ray Train sets RANK in its workers; deployed on Serve (the module's app has it) it is color_match.
        return values * float("nan") if os.environ.get("RANK") == "1" else values


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = root / "tiny"
    TinySplatGenerator.from_config({"resolution": 16, "num_layers": 1, "attention_head_dim": 16}).save_pretrained(model)
    app = {
        "app_name": APP,
        "deployments": [
            {"name": "color_match", "reward": "color_match", "num_cpus": 0},
            {"name": "dnc", "reward": "dnc", "num_cpus": 0, "num_replicas": 2},
            {"name": "rank_nan", "reward": "test_train:rank_one_nan", "num_cpus": 0},
        ],
        "http": {"enabled": False},
    }
    (root / "rewards.yaml").write_text(yaml.safe_dump(app))
    # Workers import this module for `rank_one_nan`.
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False,
             # MLflow samples system metrics every 10 s by default, longer than a test run's life.
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": path,
                                       "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}})
    yield root, model
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def make_cfg(workspace, name: str, algorithm: str, *extra: str):
    root, model = workspace
    return load_config("configs/toy.yaml", [
        f"name={name}", f"output_dir={root / 'out'}", f"model.path={model}",
        f"rewards.app_name={APP}", f"rewards.app_config={root / 'rewards.yaml'}",
        "sampling.num_steps=4", "sampling.batch_size=2", "sampling.num_batches_per_epoch=1",
        "render.size=16", "training.epochs=2", f"algorithm.name={algorithm}",
        "algorithm.nft.group_size=2", "algorithm.grpo.group_size=2", "algorithm.nabla.trajectories=fresh",
        # 2 trajectories per optimizer step in micro-batches of 1: DeepSpeed accumulates across micro-batches.
        "training.gradient_accumulation_steps=2", "training.micro_batch_size=1",
        "rewards.terms=[{name: color_match, weight: 1.0}]", *extra,
    ])


def mlflow_runs(cfg) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{cfg.name}'", output_format="list")


def step_history(cfg, metric: str = "epoch") -> list[int]:
    """The MLflow steps (optimizer steps done) at which ``metric`` was logged."""
    (run,) = mlflow_runs(cfg)
    return sorted(int(m.step) for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, metric))


def checkpoint_state(result) -> dict:
    return json.loads((Path(result.checkpoint.path) / "state.json").read_text())


@pytest.mark.parametrize("algorithm", ["nabla", "nft", "grpo", "reward_backprop"])
def test_each_algorithm_trains_and_checkpoints(workspace, algorithm):
    # NFT with its evaluation EMA and advantages over both workers' rewards (gathered by torch.distributed).
    cfg = make_cfg(workspace, f"run-{algorithm}", algorithm,
                   "rewards.terms=[{name: color_match, weight: 1.0}, {name: dnc, weight: 0.1}]",
                   "algorithm.nft.ema_decay=0.9", "algorithm.nft.reward_stats=all_workers")
    result = launch(cfg)
    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()  # NFT: the EMA, beside its policy
    assert (ckpt / "lora_old").is_dir() == (ckpt / "lora_policy").is_dir() == (algorithm == "nft")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2
    # DeepSpeed stepped once per gradient_accumulation_steps trajectories, micro-batches accumulated.
    assert cfg.optimizer_steps_per_epoch() == 1 and state["global_step"] == 2 * cfg.optimizer_steps_per_epoch()
    assert step_history(cfg) == [1, 2]  # MLflow step = optimizer steps done, one per epoch here
    (run,) = mlflow_runs(cfg)
    metrics = run.data.metrics
    assert "reward/mean" in metrics and "time/sample" in metrics and "loss" in metrics
    if algorithm == "nft":
        assert "ema_decay" in metrics and any(k.startswith("grad_norm_eps/step_") for k in metrics)
    assert run.data.params["algorithm.name"] == algorithm
    # pictures of the evaluation prompts at step 0 (base beside policy) and after each epoch; artifacts
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(Path(cfg.output_dir).resolve())  # beside the store, not in the cwd
    steps = sorted(int(p.name.split("+step+")[1].split("+")[0]) for p in (artifacts / "images").glob("*.png"))
    assert steps == [0, 1, 2], steps
    assert len(list((artifacts / "eval").glob("*.ply"))) == 4 and len(list((artifacts / "eval").glob("*.png"))) == 4
    assert (artifacts / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert yaml.safe_load((artifacts / "config.yaml").read_text())["algorithm"]["name"] == algorithm


def test_stale_trajectories_sample_one_epoch_first_and_a_rerun_resumes_the_same_mlflow_run(workspace):
    # 2 sampling batches of 2: 4 trajectories per epoch, 2 optimizer steps of 2 micro-batches each.
    stale = ["algorithm.nabla.trajectories=stale", "sampling.num_batches_per_epoch=2"]
    cfg = make_cfg(workspace, "resume-me", "nabla", *stale, "training.epochs=1")
    state = checkpoint_state(launch(cfg))
    assert cfg.optimizer_steps_per_epoch() == 2
    assert (state["epoch"], state["global_step"]) == (1, cfg.optimizer_steps_per_epoch())
    # Two sampling rounds (the sampling-only epoch's rewards at step 0, before training), one trained epoch.
    # MLflow steps are optimizer steps (2 per epoch); the sampling-only epoch sits at step 0.
    assert step_history(cfg, "reward/mean") == [0, 2] and step_history(cfg, "loss") == [2]
    (first,) = mlflow_runs(cfg)

    longer = make_cfg(workspace, "resume-me", "nabla", *stale, "training.epochs=2")
    state = checkpoint_state(launch(longer))
    (again,) = mlflow_runs(longer)
    assert again.info.run_id == first.info.run_id
    # Trains epoch 2 on the checkpoint's trajectories: no second sampling-only epoch, nothing redone or skipped.
    assert step_history(longer) == step_history(longer, "reward/mean") == [0, 2, 4]
    assert step_history(longer, "loss") == [2, 4]
    (run,) = mlflow_runs(longer)
    epochs = {int(m.step): m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch")}
    assert epochs == {0: 0, 2: 1, 4: 2}  # the epoch is a metric beside the step
    assert (state["epoch"], state["global_step"]) == (2, 2 * cfg.optimizer_steps_per_epoch())


def _kill_when(predicate, kill, timeout=240.0) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                kill()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _actor_pids(title_fragment: str) -> list[int]:
    """PIDs of live Ray actor processes whose title (ray::<Class>...) contains the fragment.
    Process titles need no dashboard, which these tests run without."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::") and title_fragment in title:
            found.append(proc.info["pid"])
    return found


def _kill(pid: int) -> None:
    import os
    import signal

    os.kill(pid, signal.SIGKILL)


def test_killed_worker_restarts_from_checkpoint_with_one_mlflow_run(workspace):
    cfg = make_cfg(workspace, "killed-worker", "nabla", "training.epochs=4", "training.max_failures=2")
    run_dir = Path(cfg.output_dir).resolve() / "ray_results" / cfg.name
    killed = []

    def kill_a_worker():
        workers = _actor_pids("RayTrainWorker")
        if workers:
            _kill(workers[0])
            killed.append(workers[0])

    watcher = _kill_when(lambda: any(run_dir.glob("checkpoint_*")), kill_a_worker)
    result = launch(cfg)
    watcher.join(timeout=1)
    assert killed, "the test never found a worker to kill"
    assert checkpoint_state(result)["epoch"] == 4
    assert step_history(cfg) == [1, 2, 3, 4]  # one MLflow run, no epoch logged twice


def test_reward_replica_killed_mid_training_does_not_stop_training(workspace):
    cfg = make_cfg(workspace, "killed-replica", "nabla", "training.epochs=3",
                   "rewards.terms=[{name: dnc, weight: 1.0}]")
    killed = []

    def kill_replica():
        replicas = _actor_pids(f"ServeReplica:{APP}:dnc")
        if replicas:
            _kill(replicas[0])
            killed.append(replicas[0])

    run_dir = Path(cfg.output_dir).resolve() / "ray_results" / cfg.name
    # Once the first epoch is checkpointed, training is under way and the replicas are up.
    watcher = _kill_when(lambda: any(run_dir.glob("checkpoint_*")) and _actor_pids(f"ServeReplica:{APP}:dnc"),
                         kill_replica)
    result = launch(cfg)
    watcher.join(timeout=1)
    assert killed
    assert checkpoint_state(result)["epoch"] == 3


def test_learning_rate_schedule_checkpoint_retention_and_system_metrics(workspace):
    """One optimizer step per epoch, 2 epochs: a linear schedule with 1 warm-up step is at lr after
    the first step and at 0 after the last; only the newest checkpoint is kept."""
    cfg = make_cfg(workspace, "schedule", "nabla", "training.lr_schedule=linear", "training.lr_warmup_steps=1",
                   "training.checkpoints_to_keep=1", "tracking.system_metrics=true")
    launch(cfg)
    (run,) = mlflow_runs(cfg)
    lr = {int(m.step): m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr")}
    assert lr == {1: pytest.approx(cfg.training.lr), 2: 0.0}
    run_dir = Path(with_absolute_paths(cfg).output_dir) / "ray_results" / cfg.name
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 1
    assert any(key.startswith("system/") for key in run.data.metrics)


@pytest.mark.parametrize("algorithm", ["nabla", "nft"])
def test_non_finite_rewards_on_one_rank_neither_hang_nor_diverge(workspace, algorithm):
    """Rank 1's rewards are all NaN: its samples are masked, not dropped, so both ranks make the
    same backward calls and DeepSpeed's collectives line up; the weights stay finite."""
    import safetensors.torch

    cfg = make_cfg(workspace, f"nan-rank1-{algorithm}", algorithm, "rewards.terms=[{name: rank_nan, weight: 1.0}]",
                   "training.epochs=1")
    result = launch(cfg, served_rewards=False)
    ckpt = Path(result.checkpoint.path)
    assert json.loads((ckpt / "state.json").read_text())["global_step"] == cfg.optimizer_steps_per_epoch()
    weights = safetensors.torch.load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(w.isfinite().all() for w in weights.values())


def test_dry_run_trains_nothing_and_bad_reward_name_is_named(workspace, capsys):
    cfg = make_cfg(workspace, "dry", "nabla")
    assert launch(cfg, dry_run=True) is None
    assert "dry run" in capsys.readouterr().out
    assert not (Path(cfg.output_dir).resolve() / "ray_results" / "dry").exists()
    bad = make_cfg(workspace, "dry", "nabla", "rewards.terms=[{name: hps}]")
    with pytest.raises(LaunchError, match=r"\['hps'\].*does not serve"):
        launch(bad, dry_run=True)


def test_workers_log_to_the_mlflow_store_the_driver_resolved(tmp_path, monkeypatch):
    cfg = load_config("configs/toy.yaml", [f"output_dir={tmp_path / 'out'}"])
    assert with_absolute_paths(cfg).tracking.tracking_uri == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert with_absolute_paths(cfg).tracking.tracking_uri == "sqlite:////elsewhere/mlflow.db"
    explicit = load_config("configs/toy.yaml", ["tracking.tracking_uri=http://mlflow:5000"])
    assert with_absolute_paths(explicit).tracking.tracking_uri == "http://mlflow:5000"
