"""How well the tiny critic (``rewards/critic.py``) ranks, on prompts and views it never saw.

* ``pairwise_accuracy``: for each held-out prompt and each negative family of
  ``rewards.critic_data.FAMILIES``, random (ground truth, negative) pairs from a render bank drawn with
  its own seed; the share of pairs where the ground truth scores higher.
* ``prior_headroom``: the committed tiny prior's samples (``infer.generate``: 20-step
  SDE-DPM-Solver++ through ``SplatPipeline``) against the ground truth of the same prompts from the
  same views (a jittered rig like the training renders'): the mean score gap is what alignment
  on the critic can still gain.

* ``gradient_agreement`` (``--gradients``): whether its gradients on different samples agree enough
  to train one LoRA for all prompts.

``python -m r2d3ray.eval.critic [--model DIR] [--gradients] [--out FILE]`` prints them (under a minute
on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from r2d3ray.eval.stats import mean_se
from r2d3ray.models.world import parse_prompt, split_prompts
from r2d3ray.rewards.critic import TINY_CRITIC_DIR, TinyCritic, prompt_indices
from r2d3ray.rewards.critic_data import FAMILIES, RenderBank, build_bank, ground_truth_splats, negatives, positives

HEADROOM_GUIDANCE_SCALE = 3.0  # configs/toy.yaml's, the prior the demo aligns
HEADROOM_RENDER_SIZE = 64  # configs/toy.yaml's render.size


@torch.no_grad()
def score(critic: TinyCritic, images: torch.Tensor, prompts: list) -> torch.Tensor:
    """Logits (N,) of images (N, 3, H, W) for prompts (N strings or ObjectSpecs)."""
    return critic(images, prompt_indices(prompts))


@torch.no_grad()
def pairwise_accuracy(critic: TinyCritic, bank: RenderBank, prompts: list[str], pairs_per_prompt: int,
                      generator: torch.Generator) -> dict:
    """Per family: ``accuracy`` (share of pairs with ground truth above the negative), its standard
    error, and the mean ``negative_score``; plus ``ground_truth_score`` over all positives drawn."""
    specs = [parse_prompt(p) for p in prompts for _ in range(pairs_per_prompt)]
    result, truth_scores = {}, []
    for family in FAMILIES:
        truth = score(critic, positives(bank, specs, generator), specs)
        fake = score(critic, negatives(bank, specs, [family] * len(specs), generator), specs)
        accuracy, se = mean_se((truth > fake).float())
        result[family] = dict(accuracy=accuracy, accuracy_se=se, negative_score=fake.mean().item())
        truth_scores.append(truth)
    result["ground_truth_score"] = torch.cat(truth_scores).mean().item()
    return result


def tiny_prior_pipeline(guidance_scale: float = HEADROOM_GUIDANCE_SCALE):
    """The committed tiny prior (eval mode) in a 20-step SDE-DPM-Solver++ ``SplatPipeline``, the sampler
    ``configs/toy.yaml`` aligns."""
    from r2d3ray.models.loading import TINY_PRIOR_DIR
    from r2d3ray.models.pipeline import SplatPipeline
    from r2d3ray.models.tiny import TinySplatGenerator

    return SplatPipeline(TinySplatGenerator.from_pretrained(TINY_PRIOR_DIR).eval(), 20, eta=1.0,
                         guidance_scale=guidance_scale)


@torch.no_grad()
def prior_headroom(critic: TinyCritic, prompts: list[str], seeds=(0,), guidance_scale: float = HEADROOM_GUIDANCE_SCALE,
                   size: int = HEADROOM_RENDER_SIZE, batch_size: int = 64) -> dict:
    """Critic scores of the committed tiny prior's samples vs the ground truth, same prompts and views.

    Returns per-view means and standard errors of ``prior_score``, ``ground_truth_score`` and their
    paired ``headroom`` (ground truth − prior), and ``prefers_ground_truth``: the share of views
    where the ground truth scores higher.
    """
    from r2d3ray.infer import generate
    from r2d3ray.render.cameras import jittered_rig
    from r2d3ray.render.rasterize import render_splats

    pipe = tiny_prior_pipeline(guidance_scale)
    prior = pipe.generator
    truth_scores, prior_scores = [], []
    for seed in seeds:
        views = torch.Generator().manual_seed(10_000 + seed)
        latents = generate(pipe, prompts, seed, batch_size)  # (P, V, C, h, w)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cameras = jittered_rig(prior.num_views, size, generator=views, batch_size=len(chunk))  # (b, V, ...)
            sampled = render_splats(prior.latents_to_splats(latents[start : start + batch_size]),
                                    cameras).images  # (b, V, 3, H, W)
            truth = render_splats(ground_truth_splats([parse_prompt(p) for p in chunk]), cameras).images
            per_view = [p for p in chunk for _ in range(prior.num_views)]
            prior_scores.append(score(critic, sampled.flatten(0, 1), per_view))
            truth_scores.append(score(critic, truth.flatten(0, 1), per_view))
    truth, sampled = torch.cat(truth_scores), torch.cat(prior_scores)
    out = {}
    for name, values in (("ground_truth_score", truth), ("prior_score", sampled), ("headroom", truth - sampled),
                         ("prefers_ground_truth", (truth > sampled).float())):
        out[name], out[f"{name}_se"] = mean_se(values)
    return dict(**out, num_views=truth.numel(), seeds=list(seeds), guidance_scale=guidance_scale, render_size=size)


def gradient_agreement(critic: TinyCritic, num_samples: int = 8, steps=(19, 11), lora_rank: int = 8,
                       seed: int = 3) -> dict:
    """Whether the critic's gradients can train one LoRA for all prompts: for ``num_samples`` samples
    of the tiny prior (a fresh LoRA added, 20 sampler steps at ``HEADROOM_GUIDANCE_SCALE``), the
    gradient of each sample's mean critic score, rendered at x̂0 from x_t of sampler step k, on the
    LoRA parameters; returns per step the mean, min and max pairwise cosine between samples.
    Near 0: the samples pull the shared LoRA in unrelated directions (random-walk alignment)."""
    from r2d3ray.models.lora import add_lora_adapter
    from r2d3ray.models.schedulers import predict_x0
    from r2d3ray.models.world import sample_prompts
    from r2d3ray.render.cameras import default_rig

    pipe = tiny_prior_pipeline()
    prior = pipe.generator
    with torch.random.fork_rng():  # the LoRA's random init decides the gradients: seeded, and the caller's RNG untouched
        torch.manual_seed(seed)
        add_lora_adapter(prior.denoiser, "policy", rank=lora_rank)
    lora = [q for q in prior.denoiser.parameters() if q.requires_grad]
    cameras = default_rig(prior.num_views, HEADROOM_RENDER_SIZE)
    generator = torch.Generator().manual_seed(seed)
    prompts = sample_prompts(num_samples, generator=generator)
    with torch.no_grad():
        rollout = pipe.sample(prompts, generator)
    result = {}
    for step in steps:
        grads = []
        for b, prompt in enumerate(prompts):
            x_t, t = rollout.latents[b : b + 1, step], rollout.timesteps[step : step + 1]
            output = prior.predict(x_t, t, prior.encode_prompts([prompt]), HEADROOM_GUIDANCE_SCALE)
            x0 = predict_x0(prior.eps_from_output(output), x_t, t, pipe.sampler.alphas_cumprod)
            images = pipe.render(x0, cameras)["images"][0]  # (V, 3, H, W)
            value = critic(images, prompt_indices([prompt] * len(images))).mean()
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(value, lora)]))
        unit = torch.nn.functional.normalize(torch.stack(grads), dim=1)  # (N, P)
        cosines = (unit @ unit.T)[~torch.eye(num_samples, dtype=torch.bool)]
        result[f"step_{step}"] = dict(mean=cosines.mean().item(), min=cosines.min().item(), max=cosines.max().item())
    return result


def held_out_pairwise(critic: TinyCritic, seed: int = 1, pairs_per_prompt: int = 8) -> dict:
    """``pairwise_accuracy`` on the 64 held-out prompts, from a bank of views drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    bank = build_bank(critic.image_size, splat_views=8, exact_views=4, jitter_views=8, generator=generator)
    return pairwise_accuracy(critic.eval(), bank, split_prompts("held_out"), pairs_per_prompt, generator)


def evaluate_critic(critic: TinyCritic, seed: int = 1, pairs_per_prompt: int = 8, headroom_seeds=(0,)) -> dict:
    """Both measures on the 64 held-out prompts (``headroom_seeds=()`` skips the prior)."""
    result = dict(pairwise=held_out_pairwise(critic, seed, pairs_per_prompt))
    if headroom_seeds:
        result["headroom"] = prior_headroom(critic, split_prompts("held_out"), headroom_seeds)
    return result


def format_report(result: dict) -> str:
    """The numbers as markdown tables."""
    pairwise = result["pairwise"]
    lines = ["| negative family | pairwise accuracy (GT > negative) | mean negative score |", "|---|---:|---:|"]
    for family in FAMILIES:
        row = pairwise[family]
        lines.append(f"| {family} | {row['accuracy']:.1%} ± {row['accuracy_se']:.1%} | {row['negative_score']:+.2f} |")
    lines.append(f"\nmean ground-truth score in these pairs: {pairwise['ground_truth_score']:+.2f}")
    if "headroom" in result:
        h = result["headroom"]
        lines += [
            f"\ntiny prior (CFG {h['guidance_scale']}, {h['num_views']} views at {h['render_size']}²) vs ground truth, same views:",
            f"- ground truth {h['ground_truth_score']:+.2f} ± {h['ground_truth_score_se']:.2f}, "
            f"prior {h['prior_score']:+.2f} ± {h['prior_score_se']:.2f}",
            f"- headroom {h['headroom']:+.2f} ± {h['headroom_se']:.2f}; ground truth preferred on "
            f"{h['prefers_ground_truth']:.1%} of views",
        ]
    if "gradient_agreement" in result:
        lines.append("\nagreement of per-sample gradients on one LoRA (pairwise cosine, 8 samples):")
        lines += [f"- sampler {step.replace('_', ' ')}: mean {c['mean']:+.3f} (min {c['min']:+.3f}, max {c['max']:+.3f})"
                  for step, c in result["gradient_agreement"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r2d3ray.eval.critic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", default=str(TINY_CRITIC_DIR), help="a critic directory (default: the committed one)")
    parser.add_argument("--seeds", type=int, default=1, help="prior seeds per held-out prompt for the headroom (0 skips it)")
    parser.add_argument("--gradients", action="store_true",
                        help="also measure how well per-sample gradients agree on one LoRA (gradient_agreement)")
    parser.add_argument("--out", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    critic = TinyCritic.load(args.model)
    result = evaluate_critic(critic, headroom_seeds=tuple(range(args.seeds)))
    if args.gradients:
        result["gradient_agreement"] = gradient_agreement(critic)
    print(format_report(result))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
