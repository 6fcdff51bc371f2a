"""`make demo`: the main job on the embedded default, end to end on a machine without a GPU.

Local Ray, the embedded rewards deployed as a Serve app, a TorchTrainer with 2 CPU workers and
DeepSpeed ZeRO-2 aligning the committed tiny prior with Nabla-R2D3 to the learned 2D critic
(``configs/toy_critic.yaml``; ``--config configs/toy.yaml`` aligns it to ``color_match`` instead),
MLflow in a local sqlite store.
It ends with what a user needs to judge the run: where the MLflow run is and how to open it,
before/after pictures and PLY files, and, measured by ``eval.metrics.evaluate`` on the held-out
prompts with the same seeds before and after: the reward and the share of its headroom closed
(headroom: the reward of the world's ground-truth objects minus the base model's), silhouette IoU
against the ground truth (which the trainer never optimises), colour accuracy, diversity and prior
KID. The numbers also go to `demo_summary.json`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from r2d3ray.config import R2D3Config, load_config
from r2d3ray.eval.metrics import RunSpec, build_combined_reward, eval_cameras, evaluate
from r2d3ray.eval.stats import paired_differences
from r2d3ray.infer import build_pipeline, generate, write_outputs
from r2d3ray.models.pipeline import render_views
from r2d3ray.models.world import parse_prompt, split_prompts
from r2d3ray.rewards.critic_data import ground_truth_splats
from r2d3ray.tracking import resolve_tracking_uri
from r2d3ray.train.launch import launch

PICTURE_PROMPTS = 4
EVAL_BATCH_SIZE = 16
# Diversity is the spread between one prompt's samples, so every held-out prompt gets two seeds.
EVAL_SEEDS = 2


@torch.no_grad()
def ground_truth_reward(cfg: R2D3Config, prompts: list[str]) -> torch.Tensor:
    """Per prompt, the configured reward of the world's ground-truth object, rendered from the same
    views as the evaluated samples: the score a perfect generator would reach."""
    reward = build_combined_reward(cfg)
    cameras = eval_cameras(cfg)
    rewards = []
    for start in range(0, len(prompts), EVAL_BATCH_SIZE):
        chunk = prompts[start:start + EVAL_BATCH_SIZE]
        views = render_views(ground_truth_splats([parse_prompt(p) for p in chunk]), cameras, reward.needs,
                             gaussian_convention=cfg.render.gaussian_convention)
        rewards.append(reward.score(views["images"], chunk, views).rewards)
    return torch.cat(rewards)


def write_pictures(cfg: R2D3Config, lora_dir: Path, prompts: list[str], seed: int) -> dict[str, list[Path]]:
    """Grids and PLY files of the first held-out prompts before and after: the evaluated samples of
    the first seed (``evaluate``'s first batch has this noise)."""
    pictures = {}
    for label, lora in (("before", None), ("after", lora_dir)):
        pipe = build_pipeline(cfg, lora)
        latents = generate(pipe, prompts[:EVAL_BATCH_SIZE], seed=seed, batch_size=EVAL_BATCH_SIZE)
        pictures[label] = write_outputs(pipe, prompts[:PICTURE_PROMPTS], latents[:PICTURE_PROMPTS],
                                        Path(cfg.output_dir) / "demo" / label, size=128)
    return pictures


def run_demo(config: str = "configs/toy_critic.yaml", overrides: list[str] | None = None) -> dict:
    started = time.monotonic()
    cfg = load_config(config, overrides)
    if not any(o.partition("=")[0].strip() == "name" for o in overrides or []):
        # Each demo is a run of its own, beside the earlier ones in MLflow: under the config's name it
        # would resume the last demo's finished run and train nothing.
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"})
    result = launch(cfg)
    if result is None or result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; nothing to evaluate")
    lora_dir = Path(result.checkpoint.path) / "lora"

    prompts = split_prompts("held_out")
    first_seed = cfg.training.seed + 12345
    seeds = list(range(first_seed, first_seed + EVAL_SEEDS))
    evaluation = evaluate(cfg, [RunSpec("base"), RunSpec("aligned", lora_dir)], prompts, seeds,
                          batch_size=EVAL_BATCH_SIZE, max_pictures=0)
    before, after = evaluation.summary["base"], evaluation.summary["aligned"]
    reward_gain = paired_differences(evaluation.samples, "aligned", "reward")
    iou_gain = paired_differences(evaluation.samples, "aligned", "silhouette_iou")
    reward_ground_truth = float(ground_truth_reward(cfg, prompts).mean())
    headroom = reward_ground_truth - before["reward"][0]
    summary = {
        "reward_before": before["reward"][0],
        "reward_after": after["reward"][0],
        "reward_gain_se": float(reward_gain.std() / math.sqrt(len(reward_gain))),
        "reward_ground_truth": reward_ground_truth,
        "headroom_closed": float(reward_gain.mean() / headroom),
        "fidelity_before": before["color_accuracy"][0],
        "fidelity_after": after["color_accuracy"][0],
        "iou_before": before["silhouette_iou"][0],
        "iou_after": after["silhouette_iou"][0],
        "iou_gain_se": float(iou_gain.std() / math.sqrt(len(iou_gain))),
        "diversity_before": before["diversity"][0],
        "diversity_after": after["diversity"][0],
        "prior_kid": after["prior_kid"][0],
        "prior_kid_se": after["prior_kid"][1],
    }
    pictures = write_pictures(cfg, lora_dir, prompts, first_seed)
    out = Path(cfg.output_dir)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    terms = " + ".join(t.name if t.weight == 1 else f"{t.weight:g}·{t.name}" for t in cfg.rewards.terms)
    print("\n" + "=" * 78)
    print(f"r2d3ray demo: {cfg.algorithm.name} on the tiny prior, reward {terms}, {cfg.training.epochs} epochs, "
          f"{time.monotonic() - started:.0f} s")
    print(f"MLflow store: {uri}  (experiment {cfg.tracking.experiment!r}, run {cfg.name!r})")
    print(f"  open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri}")
    print(f"checkpoint with the LoRA: {lora_dir}")
    for label in ("before", "after"):
        print(f"{label:>6}: " + "  ".join(str(p) for p in pictures[label] if p.suffix == ".png"))
    print(f"held-out prompts: {len(prompts)} x {len(seeds)} seeds, the same noise before and after"
          f" (gains paired, ± one standard error)")
    print(f"  reward                 {summary['reward_before']:8.4f} -> {summary['reward_after']:8.4f}  "
          f"gain {reward_gain.mean():+.4f} ± {summary['reward_gain_se']:.4f}; ground truth {reward_ground_truth:.4f}, "
          f"{summary['headroom_closed']:.1%} of the headroom closed")
    print(f"  silhouette IoU         {summary['iou_before']:8.4f} -> {summary['iou_after']:8.4f}  "
          f"gain {iou_gain.mean():+.4f} ± {summary['iou_gain_se']:.4f}  (not a training signal)")
    print(f"  colour accuracy        {summary['fidelity_before']:8.1%} -> {summary['fidelity_after']:8.1%}")
    print(f"  diversity              {summary['diversity_before']:8.4f} -> {summary['diversity_after']:8.4f}  "
          f"({summary['diversity_after'] / summary['diversity_before']:.0%} of the base model's)")
    print(f"  prior KID              {'':8} -> {summary['prior_kid']:8.4f} ± {summary['prior_kid_se']:.4f}  "
          f"(0: indistinguishable from the base model)")
    print(f"summary: {out / 'demo_summary.json'}")
    return summary
