"""Typed run configuration: YAML files in `configs/`, dotted command-line overrides, validation.

A run is described by one YAML file whose top-level sections mirror the pipeline (model, LoRA,
sampling, rendering, rewards, algorithm, training, tracking). Every section is a pydantic model
that forbids unknown keys, so a typo, a wrong type or an out-of-range value is rejected before any
work starts, with a message that names the dotted key, the value and what is allowed (and the
closest valid key for a typo).

    cfg = load_config("configs/toy.yaml", overrides=["training.lr=1e-4"])

Names follow the reference implementations (Nabla-R2D3's config.model.* / config.training.*, DiffusionNFT's config) where they
exist, so a reader can map a field to the paper's hyper-parameter table.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r2d3ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says which key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    kind: Literal["tiny", "diffsplat"] = "tiny"
    # Directory of the base model. Empty for "tiny" means the committed prior in r2d3ray/assets.
    path: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    # With bf16 weights: self-attention's product and softmax and the norm2/norm_out LayerNorms in
    # float32 (what Nabla-R2D3's HPS run did; cross-attention stays in bf16).
    fp32_softmax: bool = True
    # Recompute the transformer blocks' activations in backward (diffusers' gradient checkpointing):
    # less memory for one more forward per backward, for DiffSplat at full size.
    gradient_checkpointing: bool = False
    # Inference and evaluation: "auto" is the first CUDA device when there is one, else the CPU.
    # Training ignores it: each Ray Train worker uses the device Ray Train gives it.
    device: str = "auto"


class LoraConfig(Section):
    rank: int = Field(8, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="None: equal to rank (scale 1), as the reference")
    init: Literal["gaussian", "default", "zeros"] = "gaussian"
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
            "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2",
        ]
    )


class SamplingConfig(Section):
    num_steps: int = Field(20, ge=1, le=1000)
    eta: float = Field(1.0, ge=0.0, le=1.0)
    guidance_scale: float = Field(5.0, ge=1.0, le=50.0)
    batch_size: int = Field(4, ge=1, description="samples per sampling batch per worker")
    num_batches_per_epoch: int = Field(4, ge=1)


class RenderConfig(Section):
    size: int = Field(256, ge=8, le=2048)
    num_views: int = Field(4, ge=1, le=64)
    random_view: bool = True
    azi_delta_deg: float = Field(20.0, ge=0.0, le=360.0)
    elevation_deg: float = Field(0.0, ge=-89.0, le=89.0)
    elevation_delta_deg: float = Field(10.0, ge=0.0, le=90.0)
    # Background of the pictures and turntables `infer` writes. Rewards always see renders on white,
    # the background every reward model here was made for.
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # How splats become covariances: "gsplat" normalises the quaternion and dilates each 2D
    # covariance by 0.3 px² (gsplat's default); "diffsplat" builds the rotation from the raw
    # quaternion and adds no dilation (RaDe-GS, the rasterizer DiffSplat and Nabla-R2D3 render with).
    gaussian_convention: Literal["gsplat", "diffsplat"] = "gsplat"


class RewardTerm(Section):
    # A deployment of the reward app config; the reward's own arguments live there, with it.
    name: str
    weight: float = 1.0


class RewardsConfig(Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="color_match")])
    aggregate: Literal["mean", "max"] = "mean"
    # Score only k random views of V: the reference's memory-efficient mode (memo_efficient_mode)
    # uses 2 of 4; 0 = all views.
    views_per_sample: int = Field(0, ge=0)
    noise_std: float = Field(2e-3, ge=0.0, le=1.0)
    # The Serve application the trainer talks to; deployed from `app_config` unless already running.
    app_name: str = "rewards"
    app_config: str = "configs/rewards_toy.yaml"
    grad_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Each reward request's deadline, and how long a request that failed for the plane's reasons (a
    # replica restarting, a full queue, a deadline missed) is re-sent before the run stops: longer
    # than a GPU reward replica takes to restart.
    request_timeout_s: float = Field(300.0, gt=0.0)
    retry_budget_s: float = Field(900.0, ge=0.0)


class NablaConfig(Section):
    """Nabla-R2D3 (residual ∇-GFlowNet); names are the reference's config.model.*."""

    reward_scale: float = Field(1.0, gt=0.0, description="beta")
    reward_adaptive_scaling: Literal["squared", "sqrt", "off"] = "squared"
    reward_norm_clip: bool = False
    reward_norm_value: float = Field(1e6, gt=0.0)
    unet_reg_scale: float = Field(1e3, ge=0.0)
    timestep_fraction: float = Field(0.4, gt=0.0, le=1.0)
    low_var_subsampling: bool = True
    # "stale": train on the previous epoch's trajectories, as the reference; "fresh": this epoch's.
    trajectories: Literal["stale", "fresh"] = "stale"
    # "inference": the geometry rewards' depth-derived normals are a stop-gradient target.
    reward_context: Literal["train", "inference"] = "train"
    # The reference's x̂0 look-ahead for DPM schedulers reads ᾱ one sampling step nearer t = 0
    # (at t_prev − Δt, clipped at 1) than the timestep the network saw; off = the consistent x̂0.
    x0_alpha_one_step_ahead: bool = False
    # The full ∇-GFlowNet (a learned residual flow, reverse and terminal losses): its loss is in
    # r2d3ray/algorithms/nabla.py, but no training loop drives it; a run config with it on is rejected.
    learned_flow: bool = False
    # Where the forward residual is measured: "score" (the reference) ‖s_θ − s_ref − β·w·∇R‖², or
    # "mean", the same residual times std², ‖μ_θ − μ_ref − std²·β·w·∇R‖²: the same fixed point, but
    # the near-noiseless last transition (score per unit ε 40–200x the others') no longer outweighs the rest.
    residual_space: Literal["score", "mean"] = "score"
    reverse_loss_scale: float = Field(1.0, ge=0.0)


class NFTConfig(Section):
    """DiffusionNFT. The reference has two betas; they are named apart on purpose (see r2d3ray/algorithms/nft.py)."""

    nft_mix_beta: float = Field(1.0, gt=0.0, description="strength of the implicit +/- mix (config.beta)")
    kl_coef: float = Field(1e-4, ge=0.0, description="weight of the KL to the reference (config.train.beta)")
    adv_clip_max: float = Field(5.0, gt=0.0)
    timestep_fraction: float = Field(0.99, gt=0.0, le=1.0)
    decay_type: Literal[0, 1, 2] = 1
    group_size: int = Field(4, ge=1, description="samples per prompt (G)")
    # An exponential moving average of the policy adapter, for evaluation pictures and the saved
    # LoRA (DiffusionNFT's ema 0.9); 0 = off (the policy itself).
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    # Advantages from the rewards of all workers' samples (the reference gathers them) or of this
    # worker's only.
    reward_stats: Literal["all_workers", "per_worker"] = "all_workers"


class GRPOConfig(Section):
    """GRPO for diffusion (Flow-GRPO's `scripts/train_sd3.py`, DDPO's PPO step): group-relative
    advantages, a clipped importance ratio on the SDE sampler's transition log-probabilities, a KL to
    the reference policy. Names are Flow-GRPO's config.train.* and config.sample.*."""

    group_size: int = Field(4, ge=2, description="samples per prompt (config.sample.num_image_per_prompt)")
    clip_range: float = Field(1e-4, gt=0.0, description="PPO clip of the ratio (config.train.clip_range)")
    adv_clip_max: float = Field(5.0, gt=0.0)
    kl_coef: float = Field(0.04, ge=0.0, description="weight of the KL to the reference (config.train.beta)")
    timestep_fraction: float = Field(0.99, gt=0.0, le=1.0)
    # Advantages from the rewards of all workers' samples (Flow-GRPO gathers them) or of this worker's only.
    reward_stats: Literal["all_workers", "per_worker"] = "all_workers"


class RewardBackpropConfig(Section):
    """ReFL / DRaFT-K: the reward is backpropagated through the last K sampling steps."""

    grad_steps: int = Field(1, ge=1, description="K; 1 is ReFL-like")
    reward_scale: float = Field(1.0, gt=0.0)


class AlgorithmConfig(Section):
    name: Literal["nabla", "nft", "grpo", "reward_backprop"] = "nabla"
    nabla: NablaConfig = Field(default_factory=NablaConfig)
    nft: NFTConfig = Field(default_factory=NFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    reward_backprop: RewardBackpropConfig = Field(default_factory=RewardBackpropConfig)


class TrainingConfig(Section):
    lr: float = Field(3e-4, gt=0.0, le=1.0)
    # The learning rate over optimizer steps (diffusers' get_scheduler, as its training scripts):
    # a linear warm-up over lr_warmup_steps, then constant, cosine or linear decay to 0 at the end.
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-4, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # Epochs that train. Nabla with stale trajectories first runs one sampling-only epoch (the
    # reference's epoch -1), so it samples epochs + 1 times.
    epochs: int = Field(100, ge=1)
    # Trajectories (samples) per optimizer step, per worker, as the reference counts them.
    gradient_accumulation_steps: int = Field(4, ge=1)
    # Trajectories in one forward/backward; gradient_accumulation_steps is a multiple of it.
    micro_batch_size: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = 0
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    checkpoints_to_keep: int = Field(3, ge=1, description="the newest checkpoints Ray Train keeps")
    # Where Ray Train keeps the run's checkpoints: a directory every node shares, or a URI
    # (s3://..., gs://...) handed to Ray unchanged. Empty: $R2D3RAY_STORAGE_PATH, else
    # <output_dir>/ray_results.
    storage_path: str = ""
    max_failures: int = Field(1, ge=-1)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "TrainingConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (DeepSpeed offloads parameters only in ZeRO-3)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.gradient_accumulation_steps % self.micro_batch_size:
            raise ValueError(f"gradient_accumulation_steps ({self.gradient_accumulation_steps} trajectories per "
                             f"optimizer step) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        return self


class TrackingConfig(Section):
    # Empty: $MLFLOW_TRACKING_URI if set, else sqlite:///<output_dir>/mlflow.db.
    tracking_uri: str = ""
    experiment: str = "r2d3ray"
    eval_prompts: list[str] = Field(default_factory=list)
    log_images_every: int = Field(1, ge=1)
    # MLflow's system metrics (CPU, memory, GPU utilisation) beside the run's own, sampled by rank 0.
    system_metrics: bool = False


class PromptsConfig(Section):
    # A text file (one prompt per line) or a Parquet prompt set; empty = the tiny world's train split.
    file: str = ""
    reward_threshold: float | None = None
    reward_file: str = ""


class R2D3Config(Section):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    output_dir: str = "outputs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)

    @model_validator(mode="after")
    def _runnable(self) -> "R2D3Config":
        if self.algorithm.name == "nabla" and self.algorithm.nabla.learned_flow:
            raise ValueError("algorithm.nabla.learned_flow: the trainer trains Nabla-R2D3's forward loss only (the "
                             "reference's no-flow mode); the full ∇-GFlowNet's learned flow has a loss "
                             "(r2d3ray/algorithms/nabla.py) but no training loop. Set algorithm.nabla.learned_flow=false")
        per_epoch, accumulate = self.samples_per_epoch(), self.training.gradient_accumulation_steps
        if per_epoch % accumulate:
            raise ValueError(f"training.gradient_accumulation_steps ({accumulate} trajectories per optimizer step) "
                             f"must divide the {per_epoch} trajectories each worker samples per epoch (sampling."
                             f"batch_size x num_batches_per_epoch{' with whole groups' if self.group_size() else ''})")
        return self

    def samples_per_epoch(self) -> int:
        """Trajectories (samples) each worker samples and trains on per epoch."""
        s, group = self.sampling, self.group_size()
        if group:  # whole groups of group_size samples of one prompt
            return max(s.batch_size // group, 1) * group * s.num_batches_per_epoch
        return s.batch_size * s.num_batches_per_epoch

    def group_size(self) -> int | None:
        """Samples per prompt of the group-relative algorithms (DiffusionNFT, GRPO); None for the others."""
        return {"nft": self.algorithm.nft.group_size, "grpo": self.algorithm.grpo.group_size}.get(self.algorithm.name)

    def optimizer_steps_per_epoch(self) -> int:
        return self.samples_per_epoch() // self.training.gradient_accumulation_steps

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.lr=1e-4` -> (["training", "lr"], 1e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. training.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML ({err.problem})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[path[-1]] = value
    return data


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model inside an annotation such as `NablaConfig` or `list[RewardTerm]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _section_type(arg)) is not None:
            return found
    return None


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The section model that owns the key at `loc` (for suggesting the closest valid key)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list index, e.g. rewards.terms.0.name
        field = model.model_fields.get(part) if model else None
        model = _section_type(field.annotation) if field else None
    return model


def _describe(err: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            owner = _model_at(loc, root)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint} (valid keys here: {', '.join(valid)})")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            # pydantic's message already states what is allowed ("greater than 0", "'nabla', 'nft' ...").
            lines.append(f"{key} = {value!r}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


SectionT = typing.TypeVar("SectionT", bound=BaseModel)


def validate_options(model: type[SectionT], data: Any, what: str) -> SectionT:
    """``data`` (a dict, or already a ``model``) validated as ``model``, or a ConfigError that names
    each bad key as run configs do, prefixed by ``what`` ("pretrain config", "infer options", ...)."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{what}: {_describe(err, model)}") from None


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> R2D3Config:
    data = apply_overrides(dict(data or {}), list(overrides or []))
    try:
        return R2D3Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, R2D3Config)) from None


def _read_yaml(path: str | Path, what: str, example: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; pass a YAML file such as {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of sections, not {type(data).__name__}")
    return data


def read_options(path: str | Path, overrides: list[str], what: str, example: str) -> dict[str, Any]:
    """A YAML file of options with `key.path=value` overrides applied, for the commands whose options
    a typed section of their own checks (pretraining, the critic, the reward app)."""
    return apply_overrides(_read_yaml(path, what, example), list(overrides or []))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, section by section (a list or value in ``update`` replaces the base's)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def read_run_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A run config file as a dict, its ``base:`` file (relative to it) merged underneath.

    Run configs that differ in a few values share a base file and name only what differs, e.g.
    ``configs/diffsplat_pas_hps.yaml`` over ``configs/diffsplat_pas_base.yaml``.
    """
    path = Path(path)
    data = _read_yaml(path, "config file", "configs/toy.yaml")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: 'base' must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"config file {str(path)!r}: 'base: {base}' makes a cycle of base files")
    return deep_merge(read_run_yaml(base_path, (*_seen, path.resolve())), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> R2D3Config:
    """Load a YAML run config (None: all defaults) and apply `key.path=value` overrides."""
    data = read_run_yaml(path) if path is not None else {}
    return build_config(data, overrides)


# ---------------------------------------------------------------------------------------------
# The reward plane: a Ray Serve application with one deployment per reward model
# (configs/rewards*.yaml, read by `r2d3ray serve` and by the trainer when it deploys the app).


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class RewardDeploymentConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="deployment name and HTTP route /rewards/{name}")
    reward: str = Field(description="registered reward model, e.g. hps, aesthetic, dnc, color_match, tiny_critic")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    # Custom Ray resources each replica reserves, e.g. {reward_node: 0.01} with nodes started as
    # `ray start --resources '{"reward_node": 1}'`: the replicas go only to nodes that have them.
    resources: dict[str, float] = Field(default_factory=dict)
    max_batch_size: int = Field(8, ge=1, description="most requests merged into one forward")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, description="how long an idle replica's first request "
                                        "waits for others to merge with")
    max_ongoing_requests: int = Field(16, ge=1)
    # Requests a replica's queue holds beyond those; more are turned away (back-pressure), which
    # trainers retry after a backoff instead of piling up behind a slow reward.
    max_queued_requests: int = Field(64, ge=1)
    health_check_period_s: float = Field(10.0, gt=0.0)
    health_check_timeout_s: float = Field(30.0, gt=0.0)
    # Serve's access log writes a line per request into every job's output; on for debugging.
    access_log: bool = False


class HTTPConfig(Section):
    enabled: bool = True
    # Loopback by default. Any other address needs a bearer token, which every route but /healthz
    # checks; it is read from the environment variable `token_env` or the file `token_file` at
    # deploy time and never written into a config.
    host: str = "127.0.0.1"
    token_env: str = "R2D3RAY_REWARDS_TOKEN"
    token_file: str = ""
    access_log: bool = False  # the ingress's per-request access-log lines
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    max_batch: int = Field(64, ge=1, description="objects per request")
    max_views: int = Field(16, ge=1)
    max_image_size: int = Field(1024, ge=8, description="pixels per side")
    max_body_mb: float = Field(256.0, gt=0.0)


class RewardAppConfig(Section):
    app_name: str = Field("rewards", pattern=r"^[A-Za-z0-9_\-]+$")
    deployments: list[RewardDeploymentConfig] = Field(min_length=1)
    http: HTTPConfig = Field(default_factory=HTTPConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> "RewardAppConfig":
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError(f"deployment names must be unique, got {names}")
        return self


def load_reward_app_config(path: str | Path, overrides: list[str] | None = None) -> RewardAppConfig:
    """Load configs/rewards*.yaml (the Serve app) with the same validation as run configs."""
    data = read_options(path, overrides, "reward app config", "configs/rewards_toy.yaml")
    try:
        return RewardAppConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, RewardAppConfig)) from None
