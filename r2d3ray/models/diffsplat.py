"""DiffSplat (PixArt-Σ variant, text-conditioned) as a :class:`SplatGenerator`, from a local directory.

What it is (chenguolin/DiffSplat, `src/infer_gsdiff_pas.py`): a multi-view PixArt-Σ transformer (28 layers, 1152 wide,
patch 2, latent 32x32 per view; input 4 latent + 6 Plücker channels, output 8 = ε + learned
variance), run on 4 views whose tokens attend jointly in self-attention; T5-XXL prompt embeddings
(300 tokens x 4096, with masks); a GS-VAE that decodes each view's latent into a 256x256
12-channel splatter image, ``vae.decode(z / scaling_factor + shift_factor).sample.clamp(-1, 1)``;
DiffSplat's default rig (azimuths 0/90/180/270, elevation 10°, radius 1.4) whose Plücker rays are
computed at 256² with DiffSplat's pixel convention and bilinearly resized to 32². Nothing is
downloaded: the weights come from a directory laid out as below, which ``r2d3ray prepare-diffsplat``
(``r2d3ray.models.prepare``) writes from DiffSplat's and PixArt-Σ's released files::

    <root>/
      transformer/config.json                        the multi-view transformer (DiffSplat's
      transformer/diffusion_pytorch_model.safetensors    ``.../checkpoints/013020/transformer_ema``;
                                                         a sharded ``*.safetensors.index.json`` works too)
      gsvae/config.json                              a diffusers AutoencoderKL with 12-channel
      gsvae/diffusion_pytorch_model.safetensors          conv_in/conv_out (``convert_gsvae`` makes it
                                                         from DiffSplat's ``gsvae_gobj265k_sdxl_fp16``)
      scheduler/scheduler_config.json                PixArt-Σ's DPMSolverMultistepScheduler config
      prompt_cache/*.safetensors                     T5 prompt embeddings (``prepare.cache_prompts`` writes them)

Prompt cache format (one or more shards in ``prompt_cache/``; a prompt's embedding is looked up
by its exact text across all shards)::

    tensors   prompt_embeds   (T, D)  the unmasked tokens of every prompt, concatenated in order
              prompt_lengths  (P,)    int64, tokens per prompt (= its attention-mask sum)
    metadata  prompts         JSON list of the P prompt strings
              max_length      "300", the padded length L the embeddings are rebuilt to
              encoder         id of the text encoder (its directory name)

T5 masks are a run of ones then zeros, so (P, L, D) embeddings and (P, L) masks are rebuilt exactly
up to the padded positions, which hold zeros (the transformer masks them out of cross-attention).
The empty prompt "" (CFG's negative) must be in the cache; ``prepare-diffsplat`` always adds it.
How the embeddings are made (the reference's caption cleaning, tokenizer and precision) is
described in ``r2d3ray.models.prepare``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

from r2d3ray.models.generator import (
    SCHEDULER_DIR,
    CheckpointNotFoundError,
    PromptEmbeds,
    SplatGenerator,
    load_scheduler_config,
)
from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel
from r2d3ray.render.cameras import default_rig, plucker_rays

PROMPT_CACHE_DIR = "prompt_cache"
T5_MAX_LENGTH = 300
SPLATTER_CHANNELS = 12
HOW_TO_GET = (
    "DiffSplat's weights are on Hugging Face (chenguolin/DiffSplat, `download_ckpt.py --model_type pas`); "
    "`r2d3ray prepare-diffsplat --diffsplat DIR --pixart DIR --out DIR` turns them into the directory layout "
    "described in r2d3ray.models.diffsplat's docstring."
)


class PromptCache:
    """Read-only view of a ``prompt_cache/`` directory (format in the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        shards = sorted(self.directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointNotFoundError(
                f"prompt cache not found: looked for {self.directory}/*.safetensors. "
                "Write it with `r2d3ray prepare-diffsplat ... --out <model dir>` (see its --help)."
            )
        self.index: dict[str, tuple[Path, int, int]] = {}  # prompt -> (shard, first token, num tokens)
        layouts = set()
        for shard in shards:
            with safetensors.safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                if not {"prompts", "max_length"} <= set(meta) or not {"prompt_embeds", "prompt_lengths"} <= set(f.keys()):
                    raise ValueError(f"{shard}: not a prompt-cache shard (see r2d3ray.models.diffsplat's docstring)")
                prompts, lengths = json.loads(meta["prompts"]), f.get_tensor("prompt_lengths").tolist()
                embed_slice = f.get_slice("prompt_embeds")
                layouts.add((int(meta["max_length"]), embed_slice.get_shape()[1], meta.get("encoder", "")))
                self.dtype = embed_slice[0:1].dtype
            starts = torch.tensor([0] + lengths).cumsum(0).tolist()
            for prompt, start, length in zip(prompts, starts, lengths):
                self.index[prompt] = (shard, start, length)
        if len(layouts) != 1:
            raise ValueError(f"{self.directory}: shards disagree on (max_length, embed dim, encoder): {sorted(layouts)}")
        self.max_length, self.embed_dim, self.encoder = layouts.pop()

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.index

    def lookup(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings (B, max_length, D) in the cached dtype and masks (B, max_length) long."""
        missing = sorted({p for p in prompts if p not in self.index})
        if missing:
            raise ValueError(
                f"prompts not in the prompt cache {self.directory}: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                "add them with `r2d3ray prepare-diffsplat ... --prompts FILE` (it encodes only what is missing)"
            )
        embeds = torch.zeros(len(prompts), self.max_length, self.embed_dim, dtype=self.dtype)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for shard in {self.index[p][0] for p in prompts}:
            with safetensors.safe_open(str(shard), framework="pt") as f:
                tokens = f.get_slice("prompt_embeds")
                for row, prompt in enumerate(prompts):
                    file, start, length = self.index[prompt]
                    if file == shard:
                        embeds[row, :length] = tokens[start : start + length]
                        mask[row, :length] = 1
        return PromptEmbeds(embeds, mask)


def write_prompt_cache_shard(
    out_dir: str | os.PathLike, prompts: list[str], embeds: torch.Tensor, mask: torch.Tensor, encoder: str
) -> Path:
    """Write one cache shard from padded embeddings (P, L, D) and right-padded masks (P, L)."""
    if embeds.ndim != 3 or mask.shape != embeds.shape[:2] or len(prompts) != embeds.shape[0]:
        raise ValueError(
            f"write_prompt_cache_shard: expected P={len(prompts)} prompts, embeds (P, L, D) and mask (P, L), "
            f"got {tuple(embeds.shape)} and {tuple(mask.shape)}"
        )
    lengths = mask.long().sum(1)  # (P,)
    if not torch.equal(mask.long(), (torch.arange(mask.shape[1]) < lengths[:, None]).long()):
        raise ValueError("write_prompt_cache_shard: masks must be right-padded (ones, then zeros)")
    tokens = [row[:length] for row, length in zip(embeds, lengths.tolist())]  # P x (n_i, D)
    return write_prompt_tokens_shard(out_dir, prompts, tokens, max_length=embeds.shape[1], encoder=encoder)


def write_prompt_tokens_shard(
    out_dir: str | os.PathLike, prompts: list[str], tokens: list[torch.Tensor], max_length: int, encoder: str
) -> Path:
    """Write one cache shard from each prompt's unmasked token embeddings (n_i, D), n_i <= ``max_length``.

    Writing the tokens without padding keeps a 1000-prompt shard of T5-XXL embeddings in memory at
    ~0.3 GB instead of 4.9 GB. The file name is a hash of the encoder id and the prompts, so
    rewriting the same prompts replaces the shard; it is written under a temporary name and renamed,
    so an interrupted write never leaves a truncated shard behind.
    """
    if len(prompts) != len(tokens) or any(t.ndim != 2 or t.shape[0] > max_length for t in tokens):
        raise ValueError(
            f"write_prompt_tokens_shard: expected {len(prompts)} token arrays (n_i <= {max_length}, D), "
            f"got shapes {[tuple(t.shape) for t in tokens[:3]]}{' ...' if len(tokens) > 3 else ''}"
        )
    key = hashlib.sha1("\n".join([encoder, *prompts]).encode()).hexdigest()[:16]
    path = Path(out_dir) / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    safetensors.torch.save_file(
        {"prompt_embeds": torch.cat(tokens).contiguous(), "prompt_lengths": torch.tensor([len(t) for t in tokens])},
        str(partial),
        metadata={"prompts": json.dumps(list(prompts)), "max_length": str(max_length), "encoder": encoder},
    )  # (T, D), (P,)
    os.replace(partial, path)
    return path


def convert_gsvae(
    checkpoint_file: str | os.PathLike, sdxl_vae_config: str | os.PathLike | dict, out_dir: str | os.PathLike
) -> AutoencoderKL:
    """DiffSplat's GSVAE checkpoint -> the ``gsvae/`` directory this adapter loads.

    DiffSplat saves ``GSAutoencoderKL`` (an SDXL ``AutoencoderKL`` under ``vae.`` with 12-channel
    conv_in/conv_out, plus a ``tiny_decoder.`` it does not need here) as an accelerate checkpoint
    (``gsvae_gobj265k_sdxl_fp16/checkpoints/<iter>/model.safetensors``). ``sdxl_vae_config`` is the
    SDXL VAE's ``config.json`` (e.g. the ``vae/`` folder of the PixArt-Σ pipeline) or its dict.
    """
    config = sdxl_vae_config if isinstance(sdxl_vae_config, dict) else AutoencoderKL.load_config(str(sdxl_vae_config))
    state = safetensors.torch.load_file(str(checkpoint_file))
    vae_state = {k.removeprefix("vae."): v for k, v in state.items() if k.startswith("vae.")}
    if not vae_state:
        raise ValueError(f"{checkpoint_file}: no 'vae.' weights; expected a GSAutoencoderKL checkpoint")
    vae = AutoencoderKL.from_config({**config, "in_channels": SPLATTER_CHANNELS, "out_channels": SPLATTER_CHANNELS})
    vae.load_state_dict(vae_state, strict=True)
    vae.save_pretrained(str(out_dir))
    return vae


def missing_checkpoint_files(root: str | os.PathLike) -> list[str]:
    """What :meth:`DiffSplatGenerator.from_pretrained` needs and does not find under ``root``, one
    entry per component (empty: complete); ``r2d3ray train --dry-run`` reports the first."""
    root = Path(root)
    required = ["transformer/config.json", "gsvae/config.json", "gsvae/diffusion_pytorch_model.safetensors",
                f"{SCHEDULER_DIR}/scheduler_config.json"]
    missing = [str(root / relative) for relative in required if not (root / relative).is_file()]
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file() and not weights.with_name(weights.name + ".index.json").is_file():
        missing.append(f"{weights} (or its sharded .index.json)")
    if not any((root / PROMPT_CACHE_DIR).glob("*.safetensors")):
        missing.append(f"{root / PROMPT_CACHE_DIR}/*.safetensors (the prompt cache)")
    return missing


class DiffSplatGenerator(SplatGenerator):
    """DiffSplat PixArt-Σ: latents (B, 4, 4, 32, 32) -> GS-VAE -> splatter images (B, 4, 12, 256, 256)."""

    def __init__(
        self,
        transformer: PixArtTransformerMV2DModel,
        vae: AutoencoderKL,
        prompt_cache: PromptCache,
        scheduler_config: dict,
        num_views: int = 4,
        upcast_softmax: bool = False,
    ):
        if (vae.config.in_channels, vae.config.out_channels) != (SPLATTER_CHANNELS, SPLATTER_CHANNELS):
            raise ValueError(
                f"vae: expected 12-channel conv_in/conv_out (a GS-VAE), got in_channels={vae.config.in_channels}, "
                f"out_channels={vae.config.out_channels}"
            )
        latent_size = transformer.config.sample_size
        image_size = latent_size * 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's x8
        rig = default_rig(num_views, size=image_size)
        # DiffSplat computes the rays at image resolution with its own pixel convention, then resizes.
        plucker = plucker_rays(rig, image_size, image_size, pixel_convention="diffsplat_plucker")  # (V, 6, H, W)
        plucker = F.interpolate(plucker, size=(latent_size, latent_size), mode="bilinear", align_corners=False)
        super().__init__(
            denoiser=transformer,
            rig=rig,
            plucker=plucker,
            latent_channels=vae.config.latent_channels,
            scheduler_config=scheduler_config,
            upcast_softmax=upcast_softmax,
        )
        if prompt_cache.embed_dim != transformer.config.caption_channels:
            raise ValueError(
                f"prompt cache {prompt_cache.directory} holds {prompt_cache.embed_dim}-d embeddings, the transformer "
                f"takes caption_channels={transformer.config.caption_channels}"
            )
        if "" not in prompt_cache:
            raise ValueError(f"prompt cache {prompt_cache.directory} lacks the empty prompt '' (CFG's negative)")
        self.vae = vae.requires_grad_(False)
        self.prompt_cache = prompt_cache
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = vae.config.shift_factor or 0.0

    @classmethod
    def from_pretrained(
        cls,
        pretrained_path: str | os.PathLike,
        torch_dtype: torch.dtype = torch.float32,
        upcast_softmax: bool | None = None,
    ) -> "DiffSplatGenerator":
        """Load from a local directory (layout in the module docstring).

        ``upcast_softmax`` (float32 attention for bf16/fp16 weights) defaults to on for any dtype
        but float32.
        """
        missing = missing_checkpoint_files(pretrained_path)
        if missing:
            raise CheckpointNotFoundError(f"checkpoint file not found: looked for {missing[0]}. {HOW_TO_GET}")
        root = Path(pretrained_path)
        transformer = PixArtTransformerMV2DModel.from_pretrained(str(root / "transformer"), torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(str(root / "gsvae"), torch_dtype=torch_dtype)
        return cls(
            transformer,
            vae,
            PromptCache(root / PROMPT_CACHE_DIR),
            load_scheduler_config(root),
            upcast_softmax=torch_dtype != torch.float32 if upcast_softmax is None else upcast_softmax,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the same layout (the base model: save LoRA adapters with ``lora.save_lora``)."""
        self._check_saveable()
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(str(root / "transformer"))
        self.vae.save_pretrained(str(root / "gsvae"))
        DPMSolverMultistepScheduler.from_config(self.scheduler_config).save_config(str(root / SCHEDULER_DIR))
        cache_dir = root / PROMPT_CACHE_DIR
        if cache_dir.resolve() != self.prompt_cache.directory.resolve():
            shutil.copytree(self.prompt_cache.directory, cache_dir, dirs_exist_ok=True)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Cached T5 embeddings (B, 300, 4096); a prompt missing from the cache raises ValueError."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a list of str, got {type(prompts).__name__}")
        return self.prompt_cache.lookup(list(prompts)).to(self.device)

    def negative_embeds(self, batch_size: int) -> PromptEmbeds:
        return self.prompt_cache.lookup([""] * batch_size).to(self.device)

    def latents_to_splatter(self, latents: torch.Tensor) -> torch.Tensor:
        """GS-VAE decode: (B, V, 4, h, w) -> (B, V, 12, 8h, 8w) in [-1, 1], in ``latents``' dtype."""
        B, V = latents.shape[:2]
        z = latents.flatten(0, 1) / self.scaling_factor + self.shift_factor  # (B·V, 4, h, w)
        splatter = self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1.0, 1.0)  # (B·V, 12, H, W)
        return splatter.unflatten(0, (B, V)).to(latents.dtype)
