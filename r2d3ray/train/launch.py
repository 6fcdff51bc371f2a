"""The driver of a training run: connect to Ray, bring up the reward plane, run the TorchTrainer.

    r2d3ray train --config configs/toy.yaml [--set k=v ...] [--dry-run]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config F

Re-running with the same run name resumes from the run's latest checkpoint (Ray Train V2 keys a
run by `RunConfig(name, storage_path)`), and the MLflow run continues.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from r2d3ray.config import ConfigError, R2D3Config, RewardAppConfig, load_reward_app_config
from r2d3ray.errors import UserError
from r2d3ray.tracking import resolve_tracking_uri

NUM_MISSING_PROMPTS_SHOWN = 3
# Algorithms that train on d reward / d image (DiffusionNFT needs reward values only).
GRADIENT_ALGORITHMS = ("nabla", "reward_backprop")


class LaunchError(UserError, RuntimeError):
    """A run that cannot start or did not finish; the message names the component and what to do."""


@dataclass
class Plan:
    cfg: R2D3Config
    app: RewardAppConfig
    storage_path: str  # a local directory or a URI, as Ray Train takes it
    cpus_needed: float
    gpus_needed: float
    num_prompts: int

    def describe(self) -> str:
        t, s = self.cfg.training, self.cfg.sampling
        terms = ", ".join(f"{x.name} x{x.weight:g}" for x in self.cfg.rewards.terms)
        return "\n".join([
            f"run {self.cfg.name!r}: {self.cfg.algorithm.name} on the {self.cfg.model.kind} generator "
            f"({self.cfg.model.path or 'the committed tiny prior'})",
            f"  {t.num_workers} Ray Train workers ({'GPU' if t.use_gpu else 'CPU'}), DeepSpeed ZeRO-{t.zero_stage}, "
            f"{t.precision}, lr {t.lr:g}, {t.epochs} epochs of {s.num_batches_per_epoch} x {s.batch_size} samples, "
            f"{s.num_steps} sampling steps",
            f"  rewards: {terms} from Serve app {self.app.app_name!r} "
            f"({len(self.app.deployments)} deployments: {', '.join(d.name for d in self.app.deployments)})",
            f"  prompts: {self.num_prompts} ({self.cfg.prompts.file or 'the tiny world train split'})",
            f"  resources: {self.cpus_needed:g} CPUs, {self.gpus_needed:g} GPUs",
            f"  checkpoints: {self.storage_path.rstrip('/')}/{self.cfg.name}",
            f"  MLflow: {resolve_tracking_uri(self.cfg.tracking.tracking_uri, self.cfg.output_dir)}",
        ])


STORAGE_ENV = "R2D3RAY_STORAGE_PATH"


def is_uri(path: str) -> bool:
    return "://" in path


def in_submitted_job() -> bool:
    """Whether this driver runs as a `ray job submit` job, i.e. in a temporary, per-node copy of the
    working directory that Ray names anew whenever the code changes."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def storage_path(cfg: R2D3Config) -> str:
    """Where Ray Train keeps the run's checkpoints (see TrainingConfig.storage_path); URIs stay URIs."""
    configured = cfg.training.storage_path or os.environ.get(STORAGE_ENV, "")
    if is_uri(configured):
        return configured
    return str(Path(configured or Path(cfg.output_dir) / "ray_results").resolve())


def check_durable_locations(cfg: R2D3Config) -> None:
    """Refuse, in a submitted job, output and checkpoint locations relative to the job's working
    directory: they would land in Ray's temporary copy of it, on one node, under a new name for
    every code change, so a resubmitted run would resume nothing and its MLflow runs would be lost."""
    if not in_submitted_job():
        return
    relative = [(key, value) for key, value in (("output_dir", cfg.output_dir),
                                                ("training.storage_path", cfg.training.storage_path or
                                                 os.environ.get(STORAGE_ENV, "")))
                if value and not is_uri(value) and not Path(value).is_absolute()]
    if relative:
        key, value = relative[0]
        raise LaunchError(f"{key} is the relative path {value!r}; in a `ray job submit` job it would resolve inside "
                          "the job's temporary working directory, lost with the job and different on every "
                          f"submission. Set {key} to storage every node shares (e.g. --set {key}=/shared/r2d3ray)"
                          + (f", or ${STORAGE_ENV} / a URI such as s3://bucket/r2d3ray" if key != "output_dir" else ""))


def with_absolute_paths(cfg: R2D3Config) -> R2D3Config:
    """The config with its relative paths made absolute against the driver's working directory,
    so workers, which may run elsewhere, read the same files, and the MLflow store fixed as the
    driver resolves it: a worker's own MLFLOW_TRACKING_URI (inherited from whatever process
    started Ray) must not send the run's metrics to another store."""

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if path and not Path(path).is_absolute() else path

    return cfg.model_copy(update={
        "output_dir": absolute(cfg.output_dir),
        "tracking": cfg.tracking.model_copy(update={
            "tracking_uri": resolve_tracking_uri(cfg.tracking.tracking_uri, absolute(cfg.output_dir))}),
        "model": cfg.model.model_copy(update={"path": absolute(cfg.model.path)}),
        "rewards": cfg.rewards.model_copy(update={"app_config": absolute(cfg.rewards.app_config)}),
        "prompts": cfg.prompts.model_copy(update={"file": absolute(cfg.prompts.file),
                                                   "reward_file": absolute(cfg.prompts.reward_file)}),
    })


def make_plan(cfg: R2D3Config, config_file: str | Path | None = None) -> Plan:
    """Check everything a run needs that can be checked without a cluster, before any worker starts:
    the reward app, the model's files, the prompts (and, for DiffSplat, their cached embeddings) and
    the storage. ``config_file`` (the run config) goes into the command a missing prompt needs."""
    app = _check_reward_app(cfg)
    model_dir = _check_model_files(cfg)
    num_prompts = _check_prompts(cfg, model_dir, config_file)
    storage = storage_path(cfg)
    if not is_uri(storage):  # a bucket's permissions are Ray Train's to find out
        _check_writable(Path(storage))
    t = cfg.training
    cpus = t.num_workers * t.cpus_per_worker + sum(d.num_cpus * d.num_replicas for d in app.deployments)
    gpus = t.num_workers * int(t.use_gpu) + sum(d.num_gpus * d.num_replicas for d in app.deployments)
    return Plan(cfg, app, storage, cpus, gpus, num_prompts)


def _check_reward_app(cfg: R2D3Config) -> RewardAppConfig:
    """The reward app config, which must serve every term under the name the workers attach to,
    with a reward that has a gradient when the algorithm trains on one."""
    from r2d3ray.rewards.registry import reward_class

    try:
        app = load_reward_app_config(cfg.rewards.app_config)
    except ConfigError as err:
        raise LaunchError(f"rewards.app_config: {err}") from None
    served = {d.name for d in app.deployments}
    missing = [t.name for t in cfg.rewards.terms if t.name not in served]
    if missing:
        raise LaunchError(f"rewards.terms name {missing}, which the reward app {cfg.rewards.app_config} does not "
                          f"serve (it serves: {', '.join(sorted(served))}); fix one of the two files")
    if cfg.rewards.app_name != app.app_name:
        # The driver deploys the app under the app config's name; the workers attach to rewards.app_name.
        raise LaunchError(f"rewards.app_name is {cfg.rewards.app_name!r} but the reward app config "
                          f"{cfg.rewards.app_config} deploys app_name {app.app_name!r}; make the two names equal")
    if cfg.algorithm.name in GRADIENT_ALGORITHMS:
        models = {d.name: d.reward for d in app.deployments}
        for term in cfg.rewards.terms:
            try:
                differentiable = getattr(reward_class(models[term.name]), "differentiable", True)
            except ValueError as err:
                raise LaunchError(f"rewards.terms: {term.name!r} in {cfg.rewards.app_config}: {err}") from None
            if not differentiable:
                raise LaunchError(
                    f"algorithm {cfg.algorithm.name!r} trains on reward gradients, but reward term {term.name!r} "
                    f"(reward {models[term.name]!r}) has values only; use algorithm.name=nft or grpo, which need "
                    "values only, or a differentiable reward")
    if cfg.algorithm.name == "nabla":
        # Nabla's reward_context stops the gradient through rendered depths for every reward; a dnc
        # deployment also has its own. Two answers to one question must agree.
        context = cfg.algorithm.nabla.reward_context
        deployments = {d.name: d for d in app.deployments}
        for term in cfg.rewards.terms:
            own = deployments[term.name].kwargs.get("reward_context")
            if own is not None and own != context:
                raise LaunchError(f"algorithm.nabla.reward_context is {context!r} but reward term {term.name!r} is "
                                  f"deployed with reward_context {own!r} in {cfg.rewards.app_config}; make them equal")
    return app


def _check_model_files(cfg: R2D3Config) -> Path:
    """The model directory, which must hold every file the generator's loader reads."""
    from r2d3ray.models.loading import missing_model_files, model_directory

    if cfg.model.kind != "tiny" and not cfg.model.path:
        raise LaunchError(f"model.path is empty; a {cfg.model.kind} run needs its model directory "
                          "(written by `r2d3ray prepare-diffsplat`)")
    model_dir = model_directory(cfg)
    if not model_dir.is_dir():
        raise LaunchError(f"model.path {str(model_dir)!r} is not a directory; "
                          + ("train the tiny prior with `r2d3ray pretrain`" if cfg.model.kind == "tiny"
                             else "point model.path at the directory `r2d3ray prepare-diffsplat` writes"))
    missing = missing_model_files(cfg)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LaunchError(f"model.path {str(model_dir)!r} is incomplete: {missing[0]} is missing{more}")
    return model_dir


def _check_prompts(cfg: R2D3Config, model_dir: Path, config_file: str | Path | None) -> int:
    """The number of training prompts; DiffSplat must have every prompt the run encodes (the
    training prompts, the evaluation prompts and CFG's "") in its prompt cache."""
    from r2d3ray.eval.prompts import training_prompts

    try:
        prompts = training_prompts(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise LaunchError(f"prompts: {err}") from None
    if cfg.model.kind == "diffsplat":
        from r2d3ray.models.diffsplat import PROMPT_CACHE_DIR, PromptCache

        try:
            cache = PromptCache(model_dir / PROMPT_CACHE_DIR)
        except (FileNotFoundError, ValueError) as err:
            raise LaunchError(f"prompt cache: {err}") from None
        needed = list(dict.fromkeys(["", *prompts, *cfg.tracking.eval_prompts]))
        missing = [prompt for prompt in needed if prompt not in cache]
        if missing:
            shown = ", ".join(repr(p) for p in missing[:NUM_MISSING_PROMPTS_SHOWN])
            more = ", ..." if len(missing) > NUM_MISSING_PROMPTS_SHOWN else ""
            raise LaunchError(
                f"{len(missing)} of the {len(needed)} prompts the run encodes (prompts.file, tracking.eval_prompts "
                f"and '') are not in the prompt cache {cache.directory}: {shown}{more}; encode them with "
                f"`r2d3ray prepare-diffsplat --config {config_file or '<the run config>'} ...`"
            )
    return len(prompts)


def _check_writable(storage_path: Path) -> None:
    """Create (and remove) a file where the run's checkpoints go, or in the nearest existing folder
    above it: the run creates the folders it lacks."""
    existing = storage_path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".r2d3ray-write-check-"):
            pass
    except OSError as err:
        raise LaunchError(f"storage: cannot write checkpoints under {storage_path} ({err.strerror} in {existing}); "
                          "set output_dir to a writable directory") from None


def connect_ray(plan: Plan, address: str | None) -> None:
    """Join a running cluster (address or RAY_ADDRESS), else start a local one sized for the plan."""
    import ray

    if ray.is_initialized():
        return
    # DeepSpeed on CPU workers needs its accelerator named. A submitted job whose runtime env names
    # it already passes it on, and Ray refuses a second runtime env that sets the same variable.
    named_by_job = in_submitted_job() and "DS_ACCELERATOR" in os.environ
    env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if not plan.cfg.training.use_gpu and not named_by_job else {}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=env or None)
        return
    # A local cluster gets logical CPUs for every actor of the plan: the embedded default's two
    # workers and reward replicas share two physical cores, which is fine for a small demo.
    ray.init(num_cpus=max(int(plan.cpus_needed + 0.999), os.cpu_count() or 1),
             num_gpus=torch.cuda.device_count(), include_dashboard=False, runtime_env=env or None)


@dataclass
class ClusterCapacity:
    """Resources the cluster has now, the most its autoscaler can reach (None: not known), and
    whether it can add nodes at all."""

    now: dict[str, float]
    most: dict[str, float] | None
    autoscales: bool


def cluster_capacity() -> ClusterCapacity:
    """The connected cluster's capacity. Ray publishes the autoscaler's node groups in the GCS
    (``ClusterConfig``; Ray Train and Ray Data read it the same way); a cluster without an
    autoscaler has none."""
    import ray
    from ray._private.state import state

    return ClusterCapacity(ray.cluster_resources(), state.get_max_resources_from_cluster_config(),
                           can_add_nodes(state.get_cluster_config()))


def can_add_nodes(cluster_config) -> bool:
    """Whether an autoscaler ``ClusterConfig`` (None: no autoscaler) has a node group that can grow:
    max_count -1 (unbounded) or above its min_count."""
    return cluster_config is not None and any(
        group.max_count == -1 or group.max_count > group.min_count
        for group in cluster_config.node_group_configs if group.resources and group.max_count != 0
    )


def check_resources(plan: Plan, capacity: ClusterCapacity) -> str | None:
    """Refuse a run the cluster cannot hold; for one an autoscaling cluster can grow into, return
    a warning instead (Ray Train waits for the nodes)."""
    needed = {"CPU": plan.cpus_needed, "GPU": plan.gpus_needed}
    if all(capacity.now.get(kind, 0) >= amount for kind, amount in needed.items()):
        return None
    situation = (f"the cluster has {capacity.now.get('CPU', 0):g} CPUs and {capacity.now.get('GPU', 0):g} GPUs; "
                 f"the run needs {plan.cpus_needed:g} CPUs and {plan.gpus_needed:g} GPUs (training.num_workers, "
                 "cpus_per_worker, use_gpu and the reward deployments' num_cpus/num_gpus)")
    if capacity.autoscales:
        beyond = [kind for kind, amount in needed.items()
                  if capacity.most is not None and capacity.most.get(kind, 0) < amount]
        if not beyond:
            return f"{situation}; the autoscaler has to add nodes before the run starts"
        raise LaunchError(f"{situation}, and its autoscaler can reach at most "
                          f"{', '.join(f'{capacity.most.get(k, 0):g} {k}s' for k in beyond)}: lower them or raise "
                          "the node groups' max_workers")
    raise LaunchError(f"{situation}: lower them or add nodes")


def launch(cfg: R2D3Config, address: str | None = None, dry_run: bool = False, served_rewards: bool = True,
           config_file: str | Path | None = None):
    """Run training to the end (or resume it); returns Ray Train's Result.

    Both a dry run and a real one check the plan (`make_plan`, `check_resources`) before any worker
    starts. served_rewards=False scores the same rewards inside each worker instead of on the Serve
    plane (the baseline `r2d3ray bench pipeline` compares against). ``config_file`` is the run
    config's path, for the commands error messages suggest."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from r2d3ray.serve.deployments import (RewardAppMismatch, app_fingerprint, app_status, deploy_rewards,
                                           fingerprint_difference, running_fingerprint)
    from r2d3ray.train.loop import train_loop_per_worker

    check_durable_locations(cfg)
    cfg = with_absolute_paths(cfg)
    plan = make_plan(cfg, config_file)
    connect_ray(plan, address)
    warning = check_resources(plan, cluster_capacity())
    if warning:
        print(f"WARNING: {warning}", flush=True)
    running = app_status(plan.app.app_name) == "RUNNING"
    if dry_run:
        difference = running and fingerprint_difference(running_fingerprint(plan.app.app_name), app_fingerprint(plan.app))
        if difference:
            raise LaunchError(f"the running reward app {plan.app.app_name!r} serves something else than "
                              f"{cfg.rewards.app_config}: {'; '.join(difference)}")
        print(plan.describe())
        print(f"  reward app {plan.app.app_name!r}: {'running, would be reused' if running else 'would be deployed'}")
        print("dry run: configuration, files and resources are fine; nothing was trained")
        return None
    try:
        if served_rewards:
            deploy_rewards(plan.app, reuse=True)  # attach; deploy only where no app runs
    except RewardAppMismatch as err:
        raise LaunchError(f"reward endpoint: {err}") from None
    except Exception as err:
        raise LaunchError(f"reward endpoint: deploying Serve app {plan.app.app_name!r} from "
                          f"{cfg.rewards.app_config} failed: {err}") from err
    print(plan.describe(), flush=True)

    t = cfg.training
    # Workers stay in the driver's (or the job's) working directory instead of a per-run folder.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json"), "served_rewards": served_rewards},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=cfg.name, storage_path=plan.storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep)),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        latest = None if is_uri(plan.storage_path) else _latest_checkpoint(Path(plan.storage_path) / cfg.name)
        component, cause = failed_component(err)
        detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        raise LaunchError(f"{component} failed: {type(cause).__name__}: {detail}\n"
                          f"last checkpoint: {latest or 'none yet'}; re-run the same command to resume from it") from err
    return result


def failed_component(err: BaseException) -> tuple[str, BaseException]:
    """What a failed ``trainer.fit()`` failed on, by the type of the first worker's exception:
    "configuration", "reward endpoint", "storage" or "training worker"; and that exception."""
    import errno

    from r2d3ray.config import ConfigError
    from r2d3ray.serve.client import RewardPlaneError

    causes = [*getattr(err, "worker_failures", {}).values(), getattr(err, "controller_failure", None), err]
    # Ray Train wraps each worker's exception with its traceback string (UserExceptionWithTraceback).
    causes = [getattr(c, "_base_exc", c) for c in causes if c is not None]
    for cause in causes:
        if isinstance(cause, ConfigError):
            return "configuration", cause
        if isinstance(cause, RewardPlaneError):
            return "reward endpoint", cause
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            return "storage", cause
    return "training worker", causes[0]


def _latest_checkpoint(run_dir: Path) -> Path | None:
    # checkpoint_manager_snapshot.json shares the prefix; checkpoints are the directories
    found = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime) \
        if run_dir.is_dir() else []
    return found[-1] if found else None
