"""What a GPU machine has to confirm, in one run of under 8 minutes on one GPU.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--quick] [--stages NAME ...]
    make gpu-check                       # the same, writing outputs/gpu_check.json

Stages (each guarded: a failure is reported in the JSON and the table, and the next stage runs):

* ``render_parity`` (CUDA): benchmarks/render_parity.py, the torch renderer against gsplat's CUDA
  rasteriser, in both Gaussian conventions ("gsplat" and "diffsplat"), one seed per case. The first
  call of a gsplat CUDA op JIT-compiles gsplat (minutes, cached in ~/.cache/torch_extensions).
* ``bench_render`` (CUDA): benchmarks/bench_render.py with ``--device cuda`` at 256², 16k–262k
  Gaussians, 4 views (gsplat).
* ``diffsplat_transition`` (CUDA; ``--quick``: tiny sizes on the CPU): a DiffSplat-SIZE model with
  random weights, built from the project's classes (``PixArtTransformerMV2DModel`` with
  PixArt-Σ's dims: 28 layers, 16 heads x 72 = 1152 wide, patch 2, sample_size 32, in 10 / out 8
  channels, caption 4096; a GS-VAE = SDXL's AutoencoderKL with 12-channel conv_in/conv_out; a
  prompt cache of random T5-sized (300 x 4096) embeddings) wrapped in ``DiffSplatGenerator`` and
  ``SplatPipeline`` (bf16 weights, float32 attention softmax, rank-8 LoRA as the trainer adds it,
  4 views at 256², the "diffsplat" Gaussian convention). It samples 20 SDE steps with CFG, records
  the decoded depth range and the quaternion-norm histogram of that sample, then runs one Nabla-R2D3
  transition (``r2d3ray.algorithms.nabla``: render x̂0_θ(x_{t-1}), reference score, policy score,
  reward-gradient pull-back, loss backward, in the trainer's order) and one DiffusionNFT step (old and
  reference ε, policy ε, backward), each without and with the denoiser's gradient checkpointing.
  Per stage: wall seconds and peak ``torch.cuda.max_memory_allocated``. The reward is an in-process
  differentiable stand-in (image contrast): in a run the rewards sit on GPUs of their own.
* ``activation_estimate`` (CPU, no compute): the same model under ``FakeTensorMode``: parameter
  counts and the bytes autograd saves for backward (``saved_tensors_hooks``, one count per storage)
  in the transformer's forward (with CFG: 2 x 4 views) with and without checkpointing, and in the
  GS-VAE decode of 4 views at 256². The basis of the memory estimate in benchmarks/README.md.
* ``tiny_diffsplat_train`` (CUDA): one epoch of a tiny-DiffSplat run through ``r2d3ray train`` with
  ``training.use_gpu: true``, from the release ``r2d3ray.models.tiny_diffsplat.write_tiny_release``
  writes and ``r2d3ray prepare-diffsplat`` converts; skipped with a message when either is missing.

``--quick`` (the test suite's CPU mode): tiny sizes, only the stages that need no CUDA, < 1 minute.
Writes JSON (``--out``) and prints a markdown table for benchmarks/README.md. Exit status 0 when no
stage failed (skipped stages do not count), 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent
sys.path.insert(0, str(BENCHMARKS_DIR))  # render_parity and bench_render

STAGES = ("render_parity", "bench_render", "diffsplat_transition", "activation_estimate", "tiny_diffsplat_train")
PROMPT = "a wooden chair with a red cushion"
QUATERNION_NORM_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # 4 channels in [-1, 1]: |q| <= 2
GIB = 2**30


@dataclass(frozen=True)
class ModelSize:
    """The dims of the random-weight DiffSplat the check builds."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    sample_size: int  # latent side per view
    caption_channels: int  # T5 width
    text_length: int  # T5 tokens (padded)
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_num_groups: int
    num_views: int = 4
    num_steps: int = 20
    guidance_scale: float = 5.0  # configs/diffsplat_pas_base.yaml
    lora_rank: int = 8

    @property
    def image_size(self) -> int:  # the VAE's upsampling: x2 per block after the first
        return self.sample_size * 2 ** (len(self.vae_block_out_channels) - 1)

    def transformer_config(self) -> dict:
        width = self.num_attention_heads * self.attention_head_dim
        return dict(
            num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
            in_channels=4 + 6, out_channels=8, num_layers=self.num_layers, cross_attention_dim=width,
            sample_size=self.sample_size, patch_size=2, caption_channels=self.caption_channels,
            norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=1,
        )  # fmt: skip (the rest are diffusers' PixArt defaults: gelu-approximate, norm_eps 1e-6, ...)

    def vae_config(self) -> dict:
        blocks = len(self.vae_block_out_channels)
        return dict(
            in_channels=12, out_channels=12, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=self.vae_block_out_channels,
            layers_per_block=self.vae_layers_per_block, norm_num_groups=self.vae_norm_num_groups,
            scaling_factor=0.13025,
        )  # fmt: skip


# PixArt-Σ XL-2 with DiffSplat's overrides (its transformer_ema config.json); the SDXL VAE.
DIFFSPLAT_SIZE = ModelSize(28, 16, 72, 32, 4096, 300, (128, 256, 512, 512), 2, 32)
QUICK_SIZE = ModelSize(2, 2, 8, 8, 32, 16, (8, 16), 1, 4, num_steps=4)


# ----------------------------------------------------------------------------- guarding and timing


def run_stage(name: str, fn, *args) -> dict:
    """``fn(*args)`` -> its dict with status "ok", or the exception as status "failed"."""
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    try:
        result = fn(*args)
        result.setdefault("status", "ok")
    except Exception as err:  # one stage's failure must not stop the others
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-4000:]}
        print(result["traceback"], flush=True)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["stage_seconds"] = round(time.perf_counter() - start, 1)
    print(f"== {name}: {result['status']} ({result['stage_seconds']} s)"
          + (f": {result.get('reason') or result.get('error')}" if result["status"] != "ok" else ""), flush=True)
    return result


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


class StageMeter:
    """Wall seconds and peak allocated memory of named steps (CUDA: ``max_memory_allocated``
    since the step began, weights included; CPU: time only)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: dict[str, dict] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        row = {"seconds": round(time.perf_counter() - start, 3)}
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            row["allocated_after_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        self.steps[name] = row


# ----------------------------------------------------------------------------- render stages


def stage_render_parity(quick: bool) -> dict:
    if quick or not torch.cuda.is_available():
        return skipped("needs CUDA (gsplat's rasteriser)")
    import render_parity

    rows = render_parity.run(seeds=1)
    worst = {}
    for convention in render_parity.CONVENTIONS:
        mine = [r for r in rows if r["convention"] == convention]
        worst[convention] = {
            "max_image_or_alpha_error": max(max(r["images"], r["alphas"]) for r in mine),
            "max_gradient_error": max(r[f"grad_{p}"] for r in mine for p in render_parity.PARAMETERS),
            "ok": all(r["ok"] for r in mine),
        }
    status = "ok" if all(w["ok"] for w in worst.values()) else "failed"
    return {"status": status, "worst": worst, "cases": rows,
            **({"error": "a parity target was missed"} if status == "failed" else {})}


def stage_bench_render(quick: bool) -> dict:
    if quick or not torch.cuda.is_available():
        return skipped("needs CUDA")
    import bench_render

    return {"cases": bench_render.run(device="cuda", sizes=(16384, 65536, 262144), resolutions=(256,))}


# ----------------------------------------------------------------------------- DiffSplat-size model


def build_diffsplat(size: ModelSize, dtype: torch.dtype, device: torch.device, cache_dir: Path):
    """A random-weight DiffSplatGenerator of ``size`` on ``device`` (frozen) with a prompt cache
    holding "" and PROMPT as random T5-sized embeddings."""
    from diffusers import AutoencoderKL

    from r2d3ray.models.diffsplat import DiffSplatGenerator, PromptCache, write_prompt_cache_shard
    from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel
    from r2d3ray.models.schedulers import PIXART_SIGMA_SCHEDULER_CONFIG

    prompts = ["", PROMPT]
    lengths = torch.tensor([1, min(12, size.text_length)])
    mask = (torch.arange(size.text_length) < lengths[:, None]).long()  # (2, L), right-padded like T5's
    embeds = torch.randn(2, size.text_length, size.caption_channels, generator=torch.Generator().manual_seed(0))
    write_prompt_cache_shard(cache_dir, prompts, (embeds * mask[..., None]).to(dtype), mask, encoder="random-t5")
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 700M parameters are slow to initialise on a CPU
        transformer = PixArtTransformerMV2DModel.from_config(size.transformer_config()).to(dtype)
        vae = AutoencoderKL(**size.vae_config()).to(dtype)
    generator = DiffSplatGenerator(transformer, vae, PromptCache(cache_dir), dict(PIXART_SIGMA_SCHEDULER_CONFIG),
                                   num_views=size.num_views, upcast_softmax=dtype != torch.float32)
    return generator.requires_grad_(False).to(device)


def stand_in_reward_grad(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A differentiable in-process reward: per-object image contrast. (values (B,), d Σ values / d images)."""
    images = images.detach().float().requires_grad_(True)
    with torch.enable_grad():
        values = images.std(dim=(2, 3, 4)).mean(dim=1)  # (B,)
        (grad,) = torch.autograd.grad(values.sum(), images)
    return values.detach(), grad


def sample_statistics(generator, latents: torch.Tensor) -> dict:
    """Decoded depth range and quaternion-norm histogram of clean latents (B, V, 4, h, w)."""
    from r2d3ray.render.cameras import DIFFSPLAT_RADIUS

    with torch.no_grad():
        splatter = generator.latents_to_splatter(latents).float()  # (B, V, 12, H, W)
    depth = splatter[:, :, 11] + DIFFSPLAT_RADIUS  # camera z, the decoder's depth channel + 1.4
    norms = splatter[:, :, 6:10].norm(dim=2).flatten()  # |q| of every Gaussian
    edges = torch.tensor(QUATERNION_NORM_EDGES, device=norms.device)
    counts = torch.bucketize(norms, edges[1:-1], right=True).bincount(minlength=len(edges) - 1)
    quantiles = torch.quantile(depth.flatten()[:: max(1, depth.numel() // 100_000)],
                               torch.tensor([0.01, 0.5, 0.99], device=depth.device))
    return {
        "depth_min": round(float(depth.min()), 4), "depth_max": round(float(depth.max()), 4),
        "depth_p01_p50_p99": [round(float(q), 4) for q in quantiles],
        "quaternion_norm_edges": list(QUATERNION_NORM_EDGES),
        "quaternion_norm_fraction": [round(float(c) / norms.numel(), 4) for c in counts],
        "quaternion_norm_mean": round(float(norms.mean()), 4),
        "num_gaussians": int(norms.numel()) // latents.shape[0],
    }


def nabla_transition(pipe, rollout, embeds, cameras, meter: StageMeter, prefix: str) -> dict:
    """One Nabla-R2D3 transition of the middle step, in NablaUpdates.update's order."""
    from r2d3ray.algorithms.nabla import NablaR2D3, pull_back, render_at_x0, transition_scores
    from r2d3ray.models.lora import adapters_disabled
    from r2d3ray.models.schedulers import predict_x0

    gen, sampler, guidance = pipe.generator, pipe.sampler, pipe.guidance_scale
    idx = torch.tensor([sampler.num_inference_steps // 2])
    rows = torch.arange(1)
    x_t, x_prev = rollout.latents[rows, idx], rollout.latents[rows, idx + 1]
    t, t_prev = rollout.timesteps[idx], sampler.prev_timesteps[idx]

    def x0_policy(x):
        return predict_x0(gen.eps_from_output(gen.predict(x, t_prev, embeds, guidance)), x, t_prev, sampler.alphas_cumprod)

    with meter.step(f"{prefix}render_x0"):  # x̂0_θ(x_{t-1}) with graph, GS-VAE decode, splats, render
        x_leaf, views = render_at_x0(x_prev, x0_policy, lambda x0: pipe.render(x0, cameras))
    with meter.step(f"{prefix}reference_score"):
        with torch.no_grad(), adapters_disabled(gen.denoiser):
            eps_ref = gen.eps_from_output(gen.predict(x_t, t, embeds, guidance))
            score_ref = transition_scores(sampler, eps_ref, idx, x_t, x_prev).score
    with meter.step(f"{prefix}policy_score"):
        out_policy = gen.predict(x_t, t, embeds, guidance)
        score_policy = transition_scores(sampler, gen.eps_from_output(out_policy), idx, x_t, x_prev).score
    with meter.step(f"{prefix}reward_pull_back"):
        values, grad_images = stand_in_reward_grad(views["images"])
        reward_grad = pull_back(x_leaf, views["images"], grad_images)
        del views, x_leaf
    with meter.step(f"{prefix}backward"):
        loss, _ = NablaR2D3().loss(score_policy, score_ref, reward_grad, sampler.alphas_cumprod_at(t_prev),
                                   out_policy, rollout.outputs[rows, idx])
        loss.backward()
    return {"loss": float(loss), "reward": float(values.mean())}


def nft_step(pipe, x0: torch.Tensor, embeds, meter: StageMeter, prefix: str) -> dict:
    """One DiffusionNFT step on a clean sample (NFTUpdates.update's body for one timestep)."""
    from r2d3ray.algorithms.nft import DiffusionNFT
    from r2d3ray.models.lora import adapters_disabled, use_adapter

    gen, sampler = pipe.generator, pipe.sampler
    t = sampler.timesteps[torch.tensor([sampler.num_inference_steps // 2])]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(x0)
    x_t = sampler.add_noise(x0, noise, t)
    with meter.step(f"{prefix}old_and_reference"):
        with torch.no_grad():
            with use_adapter(gen.denoiser, "old"):
                eps_old = gen.eps_from_output(gen.predict(x_t, t, embeds))
            with adapters_disabled(gen.denoiser):
                eps_ref = gen.eps_from_output(gen.predict(x_t, t, embeds))
    with meter.step(f"{prefix}policy_forward"):
        eps_policy = gen.eps_from_output(gen.predict(x_t, t, embeds))
    with meter.step(f"{prefix}backward"):
        loss, _ = DiffusionNFT().loss(eps_policy, eps_old, eps_ref, x_t, x0, sampler.alphas_cumprod_at(t),
                                      torch.tensor([0.7]))
        loss.backward()
    return {"loss": float(loss)}


def stage_diffsplat_transition(quick: bool) -> dict:
    from r2d3ray.models.lora import add_lora_adapter, use_adapter
    from r2d3ray.models.pipeline import SplatPipeline
    from r2d3ray.render.cameras import default_rig

    if quick:
        size, device, dtype = QUICK_SIZE, torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        size, device, dtype = DIFFSPLAT_SIZE, torch.device("cuda"), torch.bfloat16
    else:
        return skipped("needs CUDA at DiffSplat size (the activation_estimate stage counts its memory on the CPU)")
    meter = StageMeter(device)
    with tempfile.TemporaryDirectory() as cache_dir:
        with meter.step("build"):
            gen = build_diffsplat(size, dtype, device, Path(cache_dir))
            add_lora_adapter(gen.denoiser, "old", rank=size.lora_rank)  # DiffusionNFT's behaviour policy
            add_lora_adapter(gen.denoiser, "policy", rank=size.lora_rank)  # the trained one, left active
        pipe = SplatPipeline(gen, size.num_steps, eta=1.0, guidance_scale=size.guidance_scale,
                             gaussian_convention="diffsplat")
        embeds = gen.encode_prompts([PROMPT])
        cameras = default_rig(size.num_views, size.image_size)
        with meter.step("sample"):  # SDE-DPM-Solver++ with CFG, every state recorded
            rollout = pipe.sample([PROMPT], torch.Generator().manual_seed(0))
        statistics = sample_statistics(gen, rollout.final)
        results = {}
        for checkpointing in (False, True):
            prefix = "checkpointing/" if checkpointing else "plain/"
            if checkpointing:
                gen.denoiser.enable_gradient_checkpointing()
            with use_adapter(gen.denoiser, "policy"):
                results[f"{prefix}nabla"] = nabla_transition(pipe, rollout, embeds, cameras, meter, f"{prefix}nabla/")
                results[f"{prefix}nabla"]["lora_grad_norm"] = _grad_norm_and_clear(gen.denoiser)
                results[f"{prefix}nft"] = nft_step(pipe, rollout.final, embeds, meter, f"{prefix}nft/")
                results[f"{prefix}nft"]["lora_grad_norm"] = _grad_norm_and_clear(gen.denoiser)
            gen.denoiser.disable_gradient_checkpointing()
    trainable = sum(p.numel() for p in gen.denoiser.parameters() if p.requires_grad)
    return {
        "size": asdict(size), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "gaussian_convention": pipe.gaussian_convention, "lora_trainable_parameters": trainable,
        "steps": meter.steps, "sample": statistics, "results": results,
    }


def _grad_norm_and_clear(module: torch.nn.Module) -> float:
    """The gradient norm the backward left on the trainable (LoRA) parameters, then cleared: a zero
    or NaN here means the step did not train."""
    grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
    module.zero_grad(set_to_none=True)
    return float(torch.stack(grads).norm()) if grads else 0.0


# ----------------------------------------------------------------------------- CPU estimate


def saved_activation_bytes(run) -> int:
    """Bytes autograd saves for backward while ``run()`` executes: each saved tensor's storage,
    counted once (views and tensors saved by two ops share a storage)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def stage_activation_estimate(quick: bool) -> dict:
    """Parameter counts and saved-for-backward bytes of the DiffSplat-size model, without compute."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel, set_mv_attention

    size, dtype = (QUICK_SIZE, torch.float32) if quick else (DIFFSPLAT_SIZE, torch.bfloat16)
    V, h = size.num_views, size.sample_size
    previous_dtype = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_default_dtype(dtype)  # build in the run's dtype (fake tensors cannot be cast in place)
        try:
            transformer = set_mv_attention(PixArtTransformerMV2DModel.from_config(size.transformer_config()),
                                           upcast_softmax=dtype != torch.float32)
            vae = AutoencoderKL(**size.vae_config())
        finally:
            torch.set_default_dtype(previous_dtype)
        transformer.requires_grad_(False)
        vae.requires_grad_(False)
        counts = {
            "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
            "vae_parameters": sum(p.numel() for p in vae.parameters()),
            "vae_decoder_parameters": sum(p.numel() for p in vae.decoder.parameters())
            + sum(p.numel() for p in vae.post_quant_conv.parameters()),
        }
        images = 2 * V  # CFG: unconditional and conditional branch of one object
        x = torch.randn(images, 10, h, h, dtype=dtype, requires_grad=True)
        text = torch.randn(images, size.text_length, size.caption_channels, dtype=dtype)
        text_mask = torch.ones(images, size.text_length, dtype=torch.long)

        def transformer_forward():
            transformer(x, encoder_hidden_states=text, encoder_attention_mask=text_mask,
                        timestep=torch.full((images,), 500), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                        cross_attention_kwargs={"num_views": V}, return_dict=False)

        latents = torch.randn(V, 4, h, h, dtype=dtype, requires_grad=True)
        saved = {"transformer_cfg_forward": saved_activation_bytes(transformer_forward)}
        transformer.enable_gradient_checkpointing()
        saved["transformer_cfg_forward_checkpointed"] = saved_activation_bytes(transformer_forward)
        saved["vae_decode_4_views"] = saved_activation_bytes(lambda: vae.decode(latents).sample.clamp(-1, 1))
    return {"size": asdict(size), "dtype": str(dtype).removeprefix("torch."), **counts,
            "saved_bytes": saved, "saved_gib": {k: round(v / GIB, 3) for k, v in saved.items()}}


# ----------------------------------------------------------------------------- tiny DiffSplat training


def stage_tiny_diffsplat_train(quick: bool) -> dict:
    if quick or not torch.cuda.is_available():
        return skipped("needs CUDA (training.use_gpu: true)")
    try:
        from r2d3ray.models.tiny_diffsplat import write_tiny_release
    except ImportError:
        return skipped("r2d3ray.models.tiny_diffsplat.write_tiny_release is not in this checkout")
    cli = [sys.executable, "-m", "r2d3ray.cli"]
    if subprocess.run([*cli, "prepare-diffsplat", "--help"], capture_output=True).returncode != 0:
        return skipped("`r2d3ray prepare-diffsplat` is not in this checkout")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_tiny_"))
    diffsplat_dir, pixart_dir = write_tiny_release(work / "release")  # DiffSplat's and PixArt's release layouts
    config = work / "tiny_diffsplat.yaml"
    # prompts of the tiny world, which the stand-in reward color_match can read a colour from
    held_out = (REPO / "configs" / "prompts" / "tiny_held_out.txt").read_text().splitlines()
    (work / "prompts.txt").write_text("\n".join(held_out[:8]) + "\n")
    config.write_text(
        f"base: {REPO / 'configs' / 'diffsplat_pas_base.yaml'}\n"
        f"prompts: {{file: {work / 'prompts.txt'}}}\n"
        f"name: gpu_check_tiny_diffsplat\noutput_dir: {work / 'outputs'}\n"
        f"model: {{path: {work / 'model'}}}\n"
        "sampling: {num_steps: 4, batch_size: 2, num_batches_per_epoch: 1}\n"
        "rewards: {terms: [{name: color_match}], app_name: rewards, app_config: "
        f"{REPO / 'configs' / 'rewards_toy.yaml'}}}\n"
        "algorithm: {nabla: {trajectories: fresh}}\n"
        "training: {epochs: 1, num_workers: 1, cpus_per_worker: 4, gradient_accumulation_steps: 2, use_gpu: true}\n"
        "tracking: {tracking_uri: " + f"sqlite:///{work / 'mlflow.db'}" + "}\n"
    )
    steps = {}
    for name, argv in (
        ("prepare", [*cli, "prepare-diffsplat", "--diffsplat", str(diffsplat_dir), "--pixart", str(pixart_dir),
                     "--out", str(work / "model"), "--config", str(config)]),
        ("train", [*cli, "train", "--config", str(config)]),
    ):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
        steps[name] = {"seconds": round(time.perf_counter() - start, 1), "returncode": proc.returncode,
                       "output_tail": (proc.stdout + proc.stderr)[-3000:]}
        if proc.returncode != 0:
            return {"status": "failed", "error": f"{name} exited with {proc.returncode}", "steps": steps}
    return {"steps": steps, "work_dir": str(work)}


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """The results as markdown tables for benchmarks/README.md."""
    lines = [f"gpu-check on {report['machine']} ({report['torch']}), {report['total_seconds']} s", "",
             "| stage | status | seconds | notes |", "|---|---|---:|---|"]
    for name, stage in report["stages"].items():
        note = stage.get("reason") or stage.get("error") or ""
        if name == "render_parity" and "worst" in stage:
            note = "; ".join(f"{c}: images/alphas {w['max_image_or_alpha_error']:.1e}, grads {w['max_gradient_error']:.1e}"
                             for c, w in stage["worst"].items())
        if name == "activation_estimate" and "saved_gib" in stage:
            note = (f"transformer {stage['transformer_parameters'] / 1e6:.1f} M, GS-VAE {stage['vae_parameters'] / 1e6:.1f} M "
                    f"params; saved GiB " + ", ".join(f"{k} {v}" for k, v in stage["saved_gib"].items()))
        lines.append(f"| {name} | {stage['status']} | {stage['stage_seconds']} | {note} |")
    transition = report["stages"].get("diffsplat_transition", {})
    if "steps" in transition:
        lines += ["", f"DiffSplat-size model ({transition['dtype']}, {transition['device']}, "
                  f"Gaussian convention {transition['gaussian_convention']}):", "",
                  "| step | seconds | peak GiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {row['seconds']} | {row.get('peak_gib', '–')} |" for name, row in transition["steps"].items()]
        s = transition["sample"]
        lines += ["", f"{transition['size']['num_steps']}-step sample: depth {s['depth_min']}..{s['depth_max']} (p1/p50/p99 {s['depth_p01_p50_p99']}); "
                  f"|q| mean {s['quaternion_norm_mean']}, fractions per bin {s['quaternion_norm_edges']}: "
                  f"{s['quaternion_norm_fraction']}"]
    bench = report["stages"].get("bench_render", {})
    if "cases" in bench:
        lines += ["", "| Gaussians | resolution | fwd+bwd s | peak MiB |", "|---:|---:|---:|---:|"]
        lines += [f"| {c['num_gaussians']:,} | {c['resolution']} | {c['seconds_fwd_bwd']} | {c['peak_mib']} |"
                  for c in bench["cases"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON file for the results")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny sizes, no CUDA stages (for tests)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args(argv)
    functions = {"render_parity": stage_render_parity, "bench_render": stage_bench_render,
                 "diffsplat_transition": stage_diffsplat_transition, "activation_estimate": stage_activation_estimate,
                 "tiny_diffsplat_train": stage_tiny_diffsplat_train}
    start = time.perf_counter()
    report = {
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()}, "
                   f"{os.cpu_count()} cores)",
        "torch": torch.__version__, "quick": args.quick,
        "stages": {name: run_stage(name, functions[name], args.quick) for name in args.stages},
    }
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n" + markdown(report))
    print(f"\nwrote {args.out}")
    return 1 if any(stage["status"] == "failed" for stage in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
