"""Inference: prompts -> splats with a base model and an optional LoRA, written for people to look at.

    r2d3ray infer --config configs/toy.yaml (--prompts FILE | --prompt TEXT) --out DIR [--lora DIR]
                  [--tag T] [--vis-normal] [--random-view] [--seed S] [--batch-size N]

(``r2d3ray sample`` is the same command.) Per prompt (``<index>_<slug>[_<tag>]``): a standard 3DGS
``.ply``, a multi-view grid ``.png``, a turntable ``.gif`` and, with ``vis_normal``, a
``_normals.png`` grid of the rendered normals.

Sampling is the training sampler (SDE-DPM-Solver++ with the config's steps, eta and CFG). There is
one seeding rule, ``generate``'s: batch k of a prompt list draws all its randomness from
``batch_generator(seed, k)``, so the same prompt list, seed and batch size give the same noise with
and without a LoRA (before/after pictures compare like with like), in ``infer``, ``eval``,
``precompute-rewards``, ``eval-prior`` and the demo, and on any worker (``jobs/infer.py`` splits
the batches over Ray actors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from pydantic import Field
from tqdm import tqdm

from r2d3ray.config import R2D3Config, RenderConfig, Section, validate_options
from r2d3ray.models.loading import check_on_device, load_generator, resolve_device
from r2d3ray.models.lora import load_lora
from r2d3ray.models.pipeline import SplatPipeline
from r2d3ray.render.cameras import Cameras, default_rig, render_rig
from r2d3ray.render.pictures import save_grid_png, save_turntable_gif
from r2d3ray.splats import save_ply

SAMPLERS = ("sde", "ode")


def slugify(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:80] or "prompt"


def resolve_lora(path: str | Path) -> Path:
    """The LoRA directory of ``path``: ``path`` itself when it holds the LoRA weights, the ``lora/``
    folder of a training checkpoint directory, or that of the newest checkpoint of a run directory
    (``<output_dir>/ray_results/<name>``, whose ``checkpoint_<timestamp>`` names sort by time)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA {str(path)!r} is not a directory; give a LoRA directory (holding "
                                f"{LORA_WEIGHT_NAME_SAFE}), a training checkpoint directory that contains lora/ "
                                "or a run directory holding checkpoint_* folders")
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if (p / "lora" / LORA_WEIGHT_NAME_SAFE).is_file())
    candidates = [path, path / "lora"] + ([checkpoints[-1] / "lora"] if checkpoints else [])
    for candidate in candidates:
        if (candidate / LORA_WEIGHT_NAME_SAFE).is_file():
            return candidate
    raise FileNotFoundError(f"no LoRA weights in {str(path)!r}: looked for {path / LORA_WEIGHT_NAME_SAFE} and "
                            f"{path / 'lora' / LORA_WEIGHT_NAME_SAFE} and checkpoint_*/lora/ under it")


def build_pipeline(cfg: R2D3Config, lora: str | Path | None = None, device: str | None = None) -> SplatPipeline:
    """The config's base model (frozen) with ``lora`` loaded as the active adapter, if given, on
    ``device`` (default: ``model.device``, whose "auto" is CUDA when available, else the CPU)."""
    lora = resolve_lora(lora) if lora is not None else None  # a bad path fails before the model loads
    device = resolve_device(cfg.model.device) if device is None else torch.device(device)
    generator = load_generator(cfg, device)
    if lora is not None:
        load_lora(generator.denoiser, lora, adapter="policy")
    check_on_device(generator, device)
    return SplatPipeline(generator, cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale, cfg.render.gaussian_convention)


def check_prompts(pipe: SplatPipeline, prompts: list[str]) -> None:
    """Refuse a prompt the generator cannot encode before any sampling; the error names it."""
    for prompt in prompts:  # one at a time: DiffSplat's cached embeddings are large
        pipe.generator.encode_prompts([prompt])


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The CPU generator of batch ``batch_index`` under ``seed``; distinct for every (seed, batch) pair
    of fewer than a million batches, so seeds s and s+1 never share a batch's noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


@torch.no_grad()
def generate_batches(pipe: SplatPipeline, prompts: list[str], seed: int = 0, batch_size: int = 8,
                     sampler: Literal["sde", "ode"] = "sde") -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """``generate`` one batch at a time: yields ``(start, prompts[start:start + batch_size], latents
    (b, V, C, h, w))``, batch k sampled from ``batch_generator(seed, k)``. For callers that measure
    each batch as it comes (``eval``, ``precompute-rewards``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        chunk, rng = prompts[start:start + batch_size], batch_generator(seed, k)
        yield start, chunk, pipe.sample(chunk, rng).final if sampler == "sde" else pipe.sample_ode(chunk, rng)


@torch.no_grad()
def generate(pipe: SplatPipeline, prompts: list[str], seed: int = 0, batch_size: int = 8,
             sampler: Literal["sde", "ode"] = "sde") -> torch.Tensor:
    """Clean latents (P, V, C, h, w) for ``prompts``, in batches of ``batch_size``; batch k draws its
    initial noise and (``"sde"``) every step's noise from ``batch_generator(seed, k)``, so a sample
    depends on its prompt, the seed, the batch size and its place in the list, never on the model.

    ``sampler``: ``"sde"``, the pipeline's SDE-DPM-Solver++ (the training sampler), or ``"ode"``,
    2nd-order DPM-Solver++ with the same number of steps (DiffusionNFT's data collection).
    """
    check_prompts(pipe, prompts)
    batches = generate_batches(pipe, prompts, seed, batch_size, sampler)
    total = math.ceil(len(prompts) / max(batch_size, 1))  # for the progress bar; generate_batches refuses batch_size < 1
    return torch.cat([latents for _, _, latents in
                      tqdm(batches, desc="sampling", unit="batch", total=total, disable=total <= 1)])


class InferOptions(Section):
    """What ``infer`` writes. ``size``: view size in pixels of grids and GIFs; ``frames``: turntable
    frames (0: no GIF); ``random_view``: jitter the grid cameras as the reward renders do in training."""

    seed: int = 0
    batch_size: int = Field(8, ge=1)
    size: int = Field(256, ge=8)
    # It becomes part of file names.
    tag: str = Field("", pattern=r"^[A-Za-z0-9_.\-]*$")
    vis_normal: bool = False
    random_view: bool = False
    frames: int = Field(36, ge=0)

    @classmethod
    def checked(cls, **options) -> "InferOptions":
        """The options, or a ConfigError naming each bad one (the message run configs give)."""
        return validate_options(cls, options, "infer options")


@torch.no_grad()
def infer_batch(pipe: SplatPipeline, prompts: list[str], batch_index: int, out_dir: str | Path,
                opts: InferOptions, render: RenderConfig) -> list[Path]:
    """Sample batch ``batch_index`` (its ``prompts``, at most ``opts.batch_size``) and write its files.
    File indices are global (``batch_index * batch_size + i``), so batches can run anywhere."""
    rng = batch_generator(opts.seed, batch_index)  # generate's batch k: the same noise
    latents = pipe.sample(prompts, rng).final
    if opts.random_view:  # the jitter is drawn after the sampling noise, from the same generator: reproducible
        cameras = render_rig(render, opts.size, jitter=True, generator=rng, batch_size=len(prompts))
    else:
        cameras = default_rig(render.num_views, opts.size)
    return write_outputs(pipe, prompts, latents, out_dir, opts.size, opts.tag, first_index=batch_index * opts.batch_size,
                         frames=opts.frames, vis_normal=opts.vis_normal, cameras=cameras, background=render.background)


def infer(pipe: SplatPipeline, prompts: list[str], out_dir: str | Path, opts: InferOptions,
          render: RenderConfig) -> list[Path]:
    """Every batch of ``prompts`` through ``infer_batch``, with a progress bar; returns the files written."""
    check_prompts(pipe, prompts)
    starts = range(0, len(prompts), opts.batch_size)
    written = []
    for k, start in enumerate(tqdm(starts, desc="infer", unit="batch")):
        written += infer_batch(pipe, prompts[start:start + opts.batch_size], k, out_dir, opts, render)
    return written


@torch.no_grad()
def write_outputs(pipe: SplatPipeline, prompts: list[str], latents: torch.Tensor, out_dir: str | Path,
                  size: int = 256, tag: str = "", first_index: int = 0, frames: int = 0, vis_normal: bool = False,
                  cameras: Cameras | None = None, background=(1.0, 1.0, 1.0)) -> list[Path]:
    """Per prompt of sampled ``latents`` (P, V, C, h, w), ``<first_index + i:04d>_<slug>[_<tag>]``:
    ``.ply``, ``.png`` (the views of ``cameras``, default: ``default_rig`` at ``size``), a turntable
    ``.gif`` of ``frames`` frames (0: none) and, with ``vis_normal``, ``_normals.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splats = pipe.splats(latents).detach()
    cameras = default_rig(pipe.generator.num_views, size) if cameras is None else cameras
    views = pipe.render_splats(splats, cameras.to(pipe.generator.device),
                               frozenset({"normals"}) if vis_normal else frozenset(), background=background)
    written = []
    for i, prompt in enumerate(prompts):
        stem = f"{first_index + i:04d}_{slugify(prompt)}" + (f"_{tag}" if tag else "")
        one = splats[i]
        save_ply(out_dir / f"{stem}.ply", one)
        written += [out_dir / f"{stem}.ply", Path(save_grid_png(views["images"][i:i + 1], out_dir / f"{stem}.png"))]
        if frames:
            written.append(Path(save_turntable_gif(one, out_dir / f"{stem}.gif", num_frames=frames, size=size,
                                                   background=background)))
        if vis_normal:
            # Camera-space OpenCV normals n in [-1, 1] shown as colours (n + 1) / 2, over a white background.
            alphas = views["alphas"][i:i + 1]  # (1, V, 1, H, W)
            picture = (views["normals"][i:i + 1] + 1) / 2 * alphas + (1 - alphas)
            written.append(Path(save_grid_png(picture, out_dir / f"{stem}_normals.png")))
    return written


class InferenceWorker:
    """A Ray actor's state for ``infer_on_ray``: one pipeline, loaded once; ``run`` samples one batch
    and returns its files as {name: bytes}, so the driver needs no filesystem shared with the actors."""

    def __init__(self, config: dict, lora: str | None, opts: InferOptions, threads: int = 1):
        torch.set_num_threads(threads)
        self.cfg = R2D3Config.model_validate(config)
        self.pipe = build_pipeline(self.cfg, lora)
        self.opts = opts

    def check(self, prompts: list[str]) -> None:
        check_prompts(self.pipe, prompts)

    def run(self, batch_index: int, prompts: list[str]) -> dict[str, bytes]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            paths = infer_batch(self.pipe, prompts, batch_index, tmp, self.opts, self.cfg.render)
            return {path.name: path.read_bytes() for path in paths}


def infer_on_ray(cfg: R2D3Config, prompts: list[str], out_dir: str | Path, opts: InferOptions,
                 lora: str | Path | None = None, num_workers: int = 2, gpus_per_worker: float | None = None) -> list[Path]:
    """``infer`` with its batches spread over ``num_workers`` Ray actors (``InferenceWorker``); the
    files are the same as ``infer``'s. Connects to the running cluster (RAY_ADDRESS) or starts a
    local one unless Ray is already initialised. ``gpus_per_worker`` None: 1 when the cluster has a
    GPU per actor, else 0."""
    import ray
    from ray.util import ActorPool

    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: expected >= 1")
    lora = str(resolve_lora(lora)) if lora is not None else None  # fails here, not in every actor
    if not ray.is_initialized():
        ray.init()
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= num_workers else 0.0
    batches = [prompts[s:s + opts.batch_size] for s in range(0, len(prompts), opts.batch_size)]
    actor_class = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(InferenceWorker)
    actors = [actor_class.remote(cfg.model_dump(mode="json"), lora, opts) for _ in range(min(num_workers, len(batches)))]
    try:
        try:  # refuse a prompt the model cannot encode before any sampling
            ray.get(actors[0].check.remote(prompts))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, (ValueError, FileNotFoundError)):
                raise err.cause from None
            raise
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        results = ActorPool(actors).map_unordered(lambda actor, job: actor.run.remote(*job), list(enumerate(batches)))
        for files in tqdm(results, total=len(batches), desc="infer", unit="batch"):
            for name, data in files.items():
                (out_dir / name).write_bytes(data)
                written.append(out_dir / name)
    finally:
        for actor in actors:
            ray.kill(actor)
    return sorted(written)

