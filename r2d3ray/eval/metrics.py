"""Compare fine-tuned generators with their base model on the same held-out prompts and seeds.

Every model is sampled with the training sampler on the same prompts, seeds and batch size, so
sample (prompt, seed) of each run starts from the same noise as the base model's (``infer.generate_batches``).
Each sample is rendered from the config's reward rig without jitter (``eval_cameras``) and measured:

* ``reward``, ``reward/<term>``: the configured reward terms, scored in this process from the reward
  app config (``build_combined_reward``; all views, no scoring noise); ``reward`` is the weighted,
  view-aggregated objective the trainer maximises.
* text-object alignment: in the tiny world ``color_accuracy`` and ``silhouette_iou``
  (``eval/prior.py``'s colour fidelity, and the render's alpha > 0.5 mask against the exact mask of
  the prompted object); for any model, ``clip_score`` when a CLIP checkpoint is given:
  100 · max(cos(image, text), 0) per view (torchmetrics' definition), mean over views.
* ``dnc``: depth-normal consistency (``rewards/dnc.py``), the geometry measure.
* ``diversity``: per prompt, the mean pairwise RMS distance between the features of its seeds'
  samples (needs >= 2 seeds); mean and standard error over prompts.
* ``prior_kid``: a KID-style distance of a run's samples from the base model's: the unbiased MMD²
  with KID's cubic kernel k(x, y) = (x·y/d + 1)³ on the same features, with a leave-one-out
  jackknife standard error over the paired samples. 0 means indistinguishable from the prior.

Features: with a CLIP checkpoint, CLIP image embeddings (L2-normalised, mean over views, rescaled to
norm √d); otherwise (the embedded world) raw pixels, RGB + alpha of each view average-pooled to
16×16 (``pixel_features``). Pixel distances see colour and silhouette changes, not semantics.

Per-sample metrics are reported as mean ± standard error over prompts × seeds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from r2d3ray.config import R2D3Config, load_reward_app_config
from r2d3ray.eval.prior import color_fidelity
from r2d3ray.eval.stats import mean_se
from r2d3ray.infer import build_pipeline, check_prompts, generate_batches, resolve_lora
from r2d3ray.models.lora import load_lora
from r2d3ray.render.cameras import Cameras, render_rig
from r2d3ray.rewards.combiner import CombinedReward
from r2d3ray.rewards.registry import build_reward, rewards_from_app_config
from r2d3ray.splats import Splats

# metric -> True when higher is better (prior_kid: lower is better).
HIGHER_IS_BETTER = {"reward": True, "color_accuracy": True, "silhouette_iou": True, "clip_score": True,
                    "dnc": True, "diversity": True, "prior_kid": False}
PIXEL_FEATURE_SIZE = 16


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(metric.split("/")[0], True)


@dataclass
class RunSpec:
    """One model to evaluate: the base (``lora`` None) or the base with a LoRA.

    ``checkpoint``: the training checkpoint directory holding ``state.json`` (its ``mlflow_run_id``,
    ``global_step`` and config name link the evaluation to the training run), if there is one.
    """

    label: str
    lora: Path | None = None
    checkpoint: Path | None = None
    state: dict = field(default_factory=dict)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.state.get("mlflow_run_id")

    @property
    def run_name(self) -> str:
        """The training run's name: the checkpoint config's ``name``, else the label."""
        return self.state.get("config", {}).get("name") or self.label


def parse_runs(text: str) -> list[RunSpec]:
    """``"base,PATH,label=PATH"`` -> RunSpecs, the base first (added when not listed).

    A PATH is a LoRA directory or a training checkpoint containing ``lora/``. The label defaults to
    ``<run name>@<global step>`` from the checkpoint's ``state.json``, else the directory name.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--runs is empty; give e.g. base,outputs/ray_results/toy-nabla/checkpoint_000009")
    runs = [RunSpec("base")]
    for item in items:
        if item == "base":
            continue
        label, sep, path = item.partition("=")
        if not sep:
            label, path = "", item
        if label and not re.fullmatch(r"[A-Za-z0-9_.@\-]+", label):
            raise ValueError(f"--runs: label {label!r} may use letters, digits and _ . @ - only")
        lora = resolve_lora(path)
        checkpoint = next((d for d in (lora, lora.parent) if (d / "state.json").is_file()), None)
        state = json.loads((checkpoint / "state.json").read_text()) if checkpoint else {}
        if not label:
            name = state.get("config", {}).get("name")
            label = f"{name}@{state.get('global_step', '?')}" if name else Path(path).resolve().name
        runs.append(RunSpec(label, lora, checkpoint, state))
    labels = [r.label for r in runs]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"--runs: labels {repeated} repeat; name them apart as label=PATH")
    return runs


def build_combined_reward(cfg: R2D3Config) -> CombinedReward:
    """The run config's reward terms, built in this process from the reward app config
    (``cfg.rewards.app_config``: deployment name -> registered reward + kwargs). All views are
    scored and no noise is added, so scores are deterministic."""
    weights = {t.name: t.weight for t in cfg.rewards.terms}
    return CombinedReward(rewards_from_app_config(cfg.rewards.app_config, weights), weights,
                          aggregate=cfg.rewards.aggregate)


def eval_cameras(cfg: R2D3Config) -> Cameras:
    """The reward renders' rig without the training jitter: evenly spaced azimuths from 0 at the
    config's base elevation and size."""
    return render_rig(cfg.render, jitter=False)


def configured_clip_checkpoint(cfg: R2D3Config) -> str | None:
    """A CLIP checkpoint the reward app already names (the aesthetic reward's ``clip_checkpoint``)."""
    for deployment in load_reward_app_config(cfg.rewards.app_config).deployments:
        if deployment.kwargs.get("clip_checkpoint"):
            return str(deployment.kwargs["clip_checkpoint"])
    return None


class ClipScorer(torch.nn.Module):
    """An OpenAI-format CLIP (e.g. ``ViT-L-14.pt``, the aesthetic reward's backbone) loaded from a
    local file through open_clip: image embeddings for features, image-text cosine for CLIP score."""

    def __init__(self, checkpoint: str | Path):
        super().__init__()
        import warnings

        import open_clip

        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP checkpoint {str(path)!r} does not exist; give OpenAI's ViT-L-14.pt or an "
                                    "OpenAI-layout state dict (nothing is downloaded)")
        with warnings.catch_warnings():  # open_clip first tries torch.jit.load, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            self.model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu").requires_grad_(False).eval()
        self.tokenize = open_clip.tokenize

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, V, 3, H, W) in [0, 1] -> (B, V, D) L2-normalised."""
        from r2d3ray.rewards.clip_utils import clip_preprocess

        pixels = clip_preprocess(images.flatten(0, 1), self.model.visual.image_size)
        return self.model.encode_image(pixels, normalize=True).unflatten(0, images.shape[:2])

    def clip_score(self, embeddings: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """embeddings (B, V, D) from ``image_embeddings`` -> (B,) 100·max(cos, 0), mean over views."""
        tokens = self.tokenize(prompts, context_length=self.model.context_length).to(embeddings.device)
        text = self.model.encode_text(tokens, normalize=True)  # (B, D)
        return (100 * (embeddings * text[:, None]).sum(-1).clamp(min=0)).mean(1)


def pixel_features(images: torch.Tensor, alphas: torch.Tensor, size: int = PIXEL_FEATURE_SIZE) -> torch.Tensor:
    """images (B, V, 3, H, W), alphas (B, V, 1, H, W) -> (B, V·4·size²): RGB + alpha pooled to size²."""
    rgba = torch.cat([images, alphas], dim=2).flatten(0, 1)  # (B·V, 4, H, W)
    return F.adaptive_avg_pool2d(rgba, size).unflatten(0, images.shape[:2]).flatten(1)


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise RMS distance ‖a − b‖ / √d between the rows of features (S, d); NaN for S < 2."""
    if features.shape[0] < 2:
        return math.nan
    return float(torch.pdist(features.double()).mean() / math.sqrt(features.shape[1]))


def kid(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Unbiased MMD² between paired samples x, y (n, d) with KID's kernel (x·y/d + 1)³, and its
    leave-one-pair-out jackknife standard error (NaN for n < 4; the estimate needs n >= 2).

    Own code: torchmetrics' KID is tied to Inception features and reports a std over random
    subsets, not a standard error; the jackknife reuses the three kernel matrices.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"kid: expected two (n, d) feature sets of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, d = x.shape
    if n < 2:
        return math.nan, math.nan
    x, y = x.double(), y.double()
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))  # (n, n) each

    def mmd2(sxx, syy, sxy, m):
        return (sxx + syy) / (m * (m - 1)) - 2 * sxy / m**2

    kxx.fill_diagonal_(0)
    kyy.fill_diagonal_(0)
    sxx, syy, sxy = kxx.sum(), kyy.sum(), kxy.sum()
    estimate = float(mmd2(sxx, syy, sxy, n))
    if n < 4:
        return estimate, math.nan
    # Removing pair i drops row and column i of every kernel matrix.
    loo = mmd2(sxx - 2 * kxx.sum(1), syy - 2 * kyy.sum(1), sxy - kxy.sum(1) - kxy.sum(0) + kxy.diagonal(), n - 1)
    return estimate, float(math.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))


@dataclass
class Evaluation:
    """What ``evaluate`` measured.

    samples: one dict per run × prompt × seed: ``run, prompt, seed`` and each per-sample metric.
    summary: run label -> metric -> (mean, standard error).
    pictures: run label -> (P', V, 3, H, W) renders of the first prompts at the first seed.
    splats: run label -> the (P', N) objects behind those pictures (the report's 3D viewers).
    """

    runs: list[RunSpec]
    prompts: list[str]
    seeds: list[int]
    feature_space: str
    samples: list[dict]
    summary: dict[str, dict[str, tuple[float, float]]]
    pictures: dict[str, torch.Tensor]
    notes: list[str]
    splats: dict[str, Splats] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """Metric names in table order (those some run has)."""
        names = []
        for per_run in self.summary.values():
            names += [m for m in per_run if m not in names]
        return names


@torch.no_grad()
def evaluate(cfg: R2D3Config, runs: list[RunSpec], prompts: list[str], seeds: list[int], batch_size: int = 8,
             clip_checkpoint: str | Path | None = None, max_pictures: int = 8) -> Evaluation:
    """Sample every run on ``prompts`` × ``seeds`` and measure it (see the module docstring)."""
    if not prompts or not seeds or batch_size < 1:
        raise ValueError(f"need at least one prompt and one seed and batch_size >= 1, got {len(prompts)} prompts, "
                         f"seeds {seeds}, batch_size {batch_size}")
    if runs[0].lora is not None:
        raise ValueError("runs[0] must be the base model (parse_runs puts it first)")
    notes = []
    pipe = build_pipeline(cfg)
    check_prompts(pipe, prompts)
    device = pipe.generator.device
    reward = build_combined_reward(cfg).to(device)
    dnc = build_reward("dnc").to(device)
    cameras = eval_cameras(cfg)
    needs = reward.needs | dnc.needs
    tiny_world = cfg.model.kind == "tiny"
    if tiny_world:
        from r2d3ray.models.world import parse_prompt, silhouette, silhouette_iou

        masks = torch.stack([silhouette(parse_prompt(p), cameras) for p in prompts])  # (P, V, 1, H, W) bool
    if clip_checkpoint is None and (configured := configured_clip_checkpoint(cfg)):
        if Path(configured).expanduser().is_file():
            clip_checkpoint = configured
        else:
            notes.append(f"the reward app's clip_checkpoint {configured!r} does not exist")
    clip = ClipScorer(clip_checkpoint).to(device) if clip_checkpoint else None
    if clip is None:
        notes.append("clip_score skipped: no CLIP checkpoint (pass --clip-checkpoint, or name one as a reward's "
                     "clip_checkpoint); prior_kid and diversity use pixel features")
    feature_space = "CLIP image embeddings" if clip else f"pixels (RGB + alpha, {PIXEL_FEATURE_SIZE}x{PIXEL_FEATURE_SIZE} per view)"

    samples, features, pictures, objects = [], {}, {}, {}
    denoiser = pipe.generator.denoiser
    total = len(runs) * len(seeds) * math.ceil(len(prompts) / batch_size)
    progress = tqdm(total=total, desc="eval", unit="batch")
    for index, run in enumerate(runs):
        if run.lora is not None:
            # Each run is its own adapter on the one base model; loading one makes it the active one.
            load_lora(denoiser, run.lora, adapter=f"eval{index}")
        run_features, run_pictures, run_objects = [], [], []  # per seed (P, d); (b, V, 3, H, W) chunks; Splats
        for seed in seeds:
            seed_features = []
            # infer.generate's batches: sample (prompt, seed) has the same noise in every run and in `infer`.
            for start, chunk, latents in generate_batches(pipe, prompts, seed, batch_size):
                splats = pipe.splats(latents)
                views = pipe.render_splats(splats, cameras, needs)
                extras = {k: views[k] for k in needs}
                scored = reward.score(views["images"], chunk, extras)
                metrics = {"reward": scored.rewards}
                metrics.update({f"reward/{name}": values.mean(1) for name, values in scored.components.items()})
                metrics["dnc"] = dnc.score(views["images"], chunk, extras).values.mean(1)
                if tiny_world:
                    metrics["color_accuracy"] = color_fidelity(splats, chunk)
                    metrics["silhouette_iou"] = silhouette_iou(views["alphas"].cpu(), masks[start:start + batch_size])
                if clip is not None:
                    embeddings = clip.image_embeddings(views["images"])  # (b, V, D)
                    metrics["clip_score"] = clip.clip_score(embeddings, chunk)
                    seed_features.append(F.normalize(embeddings.mean(1), dim=-1) * math.sqrt(embeddings.shape[-1]))
                else:
                    seed_features.append(pixel_features(views["images"], views["alphas"]))
                for i, prompt in enumerate(chunk):
                    samples.append({"run": run.label, "prompt": prompt, "seed": seed,
                                    **{k: float(v[i]) for k, v in metrics.items()}})
                if seed == seeds[0] and start < max_pictures:
                    run_pictures.append(views["images"][: max_pictures - start].cpu())
                    run_objects.append(splats.detach().to("cpu").first(max_pictures - start))
                progress.update()
            run_features.append(torch.cat(seed_features).cpu())
        features[run.label] = torch.stack(run_features)  # (S, P, d)
        pictures[run.label] = torch.cat(run_pictures) if run_pictures else torch.empty(0)
        if run_objects:
            objects[run.label] = Splats.cat(run_objects)
    progress.close()

    summary = {}
    for run in runs:
        rows = [s for s in samples if s["run"] == run.label]
        names = [k for k in rows[0] if k not in ("run", "prompt", "seed")]
        summary[run.label] = {k: mean_se([r[k] for r in rows]) for k in names}
        per_prompt = features[run.label].transpose(0, 1)  # (P, S, d)
        summary[run.label]["diversity"] = mean_se([diversity(f) for f in per_prompt])
        if run.lora is not None:
            base = features[runs[0].label].flatten(0, 1)
            summary[run.label]["prior_kid"] = kid(base, features[run.label].flatten(0, 1))
    if len(seeds) < 2:
        notes.append("diversity needs at least 2 seeds; it is NaN")
    if len(prompts) * len(seeds) < 4:
        notes.append("prior_kid has no standard error below 4 samples per run")
    return Evaluation(runs, list(prompts), list(seeds), feature_space, samples, summary, pictures, notes, objects)


@torch.no_grad()
def base_model_rewards(cfg: R2D3Config, prompts: list[str], seeds: list[int], batch_size: int = 8) -> list[dict]:
    """Reward-cache rows (``eval/prompts.py``'s ``REWARD_CACHE_SCHEMA``) for the base model: each
    configured reward term of every prompt x seed, mean over the ``eval_cameras`` views. The samples
    are ``evaluate``'s base-model samples (same noise, same views)."""
    from datetime import datetime, timezone

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    pipe = build_pipeline(cfg)
    check_prompts(pipe, prompts)
    reward = build_combined_reward(cfg).to(pipe.generator.device)
    cameras = eval_cameras(cfg)
    model = cfg.model.path or "tiny prior"
    rows = []
    progress = tqdm(total=len(seeds) * math.ceil(len(prompts) / batch_size), desc="precompute-rewards", unit="batch")
    for seed in seeds:
        # evaluate's base-model batches: the same noise, so the cache matches its samples
        for _, chunk, latents in generate_batches(pipe, prompts, seed, batch_size):
            views = pipe.render(latents, cameras, reward.needs)
            scored = reward.score(views["images"], chunk, {key: views[key] for key in reward.needs})
            created = datetime.now(timezone.utc)
            for name, values in scored.components.items():
                rows += [{"prompt": p, "seed": seed, "reward": float(v), "reward_name": name, "model": model,
                          "created": created} for p, v in zip(chunk, values.mean(1).tolist())]
            progress.update()
    progress.close()
    return rows
