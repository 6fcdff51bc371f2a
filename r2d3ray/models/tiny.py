"""The embedded default generator: a tiny text-to-splat prior the project trains itself.

Same family as DiffSplat, scaled down so it trains and runs on a CPU: a multi-view PixArt
transformer (diffusers' ``PixArtTransformer2DModel`` with our multi-view attention), an
ε-predictor to every sampler, Plücker-ray conditioning from DiffSplat's default rig. There is no
VAE: the latents *are* DiffSplat-layout splatter images at low resolution, ``(B, V=4, 12, 32, 32)``
in [-1, 1] (see ``r2d3ray/splats.py``), so decoding is a clamp and 4·32·32 = 4096 Gaussians make
an object. The prompt encoder needs no download: the procedural world's vocabulary
(``models/world.py``) maps to learned embeddings.

Two choices differ from DiffSplat, both because the network is small:

* The transformer predicts the clean sample x̂0, turned into ε exactly: ε = (x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t).
  A patch-4 token of width 96 cannot carry the 4·4·12 = 192 independent noise values that an ε-
  (or v-) prediction must reproduce per token (measured: the ε loss stalls at 0.5 even at t = 950,
  where ε ≈ x_t, and v-prediction leaves that noise in the samples, as x̂0 = α·x_t − σ·v̂ passes it
  through); the clean object is what the tokens can carry (flat colour, smooth depth, one edge).
  Everything downstream sees an ε-predictor; pretraining weights its ε loss by min-SNR-γ so low-t
  steps, where ε = (x_t − α·x̂0)/σ magnifies x̂0 errors by α/σ, do not dominate.
* The noise schedule is Stable Diffusion's "scaled_linear" β 0.00085 → 0.012 (the SD family
  DiffSplat builds on) rather than PixArt-Σ's linear 1e-4 → 0.02, whose terminal x̂0 = (x_t − σε)/α
  magnifies ε errors 157x instead of 15x, and samplers clip x̂0 to [-1, 1], the box splatter
  images live in (diffusers' ``thresholding`` with ``sample_max_value=1``).

On-disk layout (diffusers-like; ``from_pretrained``/``save_pretrained``)::

    generator_config.json                 {"_class_name": "TinySplatGenerator", "num_views": 4}
    transformer/config.json               PixArtTransformerMV2DModel config
    transformer/diffusion_pytorch_model.safetensors
    prompt_encoder/config.json            vocabulary and width
    prompt_encoder/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json       DPMSolverMultistepScheduler config
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from r2d3ray.models.generator import (
    SCHEDULER_DIR,
    PromptEmbeds,
    SplatGenerator,
    load_scheduler_config,
    require_files,
)
from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel
from r2d3ray.models.schedulers import PIXART_SIGMA_SCHEDULER_CONFIG
from r2d3ray.models.world import ATTRIBUTES, COLORS, SHAPES, SIZES, parse_prompt
from r2d3ray.render.cameras import default_rig, plucker_rays

SPLATTER_CHANNELS = 12

# The tiny prior's noise schedule and x̂0 clipping (module docstring), saved with every checkpoint.
TINY_SCHEDULER_CONFIG: dict = {
    **PIXART_SIGMA_SCHEDULER_CONFIG,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "thresholding": True, "sample_max_value": 1.0,
}
GENERATOR_CONFIG_NAME = "generator_config.json"
# What from_pretrained reads (the on-disk layout in the module docstring).
CHECKPOINT_FILES = [
    GENERATOR_CONFIG_NAME,
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "prompt_encoder/config.json",
    "prompt_encoder/diffusion_pytorch_model.safetensors",
    f"{SCHEDULER_DIR}/scheduler_config.json",
]
HOW_TO_GET = "Train the tiny prior with `r2d3ray pretrain` or save one with TinySplatGenerator.save_pretrained."

# Flat knobs of the tiny prior; ``TinySplatGenerator.from_config`` accepts any subset.
# Patch 4 on 32x32 views gives 64 tokens per view, 256 in the joint self-attention. This size
# (0.6 M parameters, 2.4 MB) runs a batch of 8 objects x 4 views in about 60 ms on one CPU core.
TINY_DEFAULT_CONFIG: dict = dict(
    num_views=4,
    resolution=32,  # splatter-image (= latent) size per view
    patch_size=4,
    num_layers=3,
    num_attention_heads=4,
    attention_head_dim=24,  # width 96
    caption_channels=64,
)


class PromptTokenEncoder(ModelMixin, ConfigMixin):
    """Prompts of the procedural world -> learned token embeddings ``(B, 5, caption_channels)``.

    A prompt is parsed by ``world.parse_prompt`` into one slot per role (start, size, attribute,
    colour, shape); the position embedding is the slot's. Every prompt has the start token, so
    the empty prompt "" (the unconditional branch of CFG) is the start token alone. Word order
    and articles therefore do not matter: "a red small cube" encodes like "a small red cube".
    """

    ROLES = ("size", "attribute", "color", "shape")

    @register_to_config
    def __init__(self, vocab: list[str] | None = None, caption_channels: int = 64):
        super().__init__()
        if not vocab:
            raise ValueError("PromptTokenEncoder: vocab must be a non-empty list of words")
        self.word_ids = {word: i + 1 for i, word in enumerate(vocab)}  # id 0 = the start token
        self.token_embedding = nn.Embedding(len(vocab) + 1, caption_channels)
        self.position_embedding = nn.Embedding(1 + len(self.ROLES), caption_channels)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, 5) long and mask (B, 5) bool; unknown words raise ValueError."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a list of str, got {type(prompts).__name__}")
        ids = torch.zeros(len(prompts), 1 + len(self.ROLES), dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 0] = True
        for row, prompt in enumerate(prompts):
            if not prompt.strip():
                continue  # the unconditional prompt
            spec = parse_prompt(prompt)  # ValueError listing the world's words
            for slot, role in enumerate(self.ROLES, start=1):
                word = getattr(spec, role)
                if not word:
                    continue
                if word not in self.word_ids:
                    raise ValueError(
                        f"prompt {prompt!r}: word {word!r} was not in this model's training vocabulary; "
                        f"it knows {sorted(self.word_ids)}"
                    )
                ids[row, slot], mask[row, slot] = self.word_ids[word], True
        return ids.to(self.device), mask.to(self.device)

    def forward(self, prompts: list[str]) -> PromptEmbeds:
        ids, mask = self.tokenize(prompts)
        embeds = self.token_embedding(ids) + self.position_embedding.weight  # (B, 5, caption_channels)
        return PromptEmbeds(embeds * mask.unsqueeze(-1).to(embeds.dtype), mask)


def world_vocabulary() -> list[str]:
    """The words the tiny prior is trained on: sizes, attributes, colours and shapes of the world."""
    return [w for w in SIZES if w] + [w for w in ATTRIBUTES if w] + list(COLORS) + list(SHAPES)


class TinySplatGenerator(SplatGenerator):
    """The tiny prior: latents = splatter images (B, V, 12, r, r), ε-prediction, no learned sigma."""

    def __init__(
        self,
        transformer: PixArtTransformerMV2DModel,
        prompt_encoder: PromptTokenEncoder,
        num_views: int = 4,
        scheduler_config: dict | None = None,
    ):
        rig = default_rig(num_views)
        resolution = transformer.config.sample_size
        super().__init__(
            denoiser=transformer,
            rig=rig,
            plucker=plucker_rays(rig, resolution, resolution),  # (V, 6, r, r)
            latent_channels=SPLATTER_CHANNELS,
            scheduler_config=TINY_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config,
        )
        self.prompt_encoder = prompt_encoder
        # ᾱ_t of the training schedule (num_train_timesteps,), for the x̂0 → ε conversion in _denoise.
        alphas_cumprod = DPMSolverMultistepScheduler.from_config(self.scheduler_config).alphas_cumprod
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @classmethod
    def from_config(cls, config: dict | None = None, scheduler_config: dict | None = None) -> "TinySplatGenerator":
        """A randomly initialised prior; ``config`` overrides keys of ``TINY_DEFAULT_CONFIG``,
        ``scheduler_config`` keys of ``TINY_SCHEDULER_CONFIG``."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(TINY_DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"TinySplatGenerator.from_config: unknown keys {unknown}; known: {sorted(TINY_DEFAULT_CONFIG)}")
        c = {**TINY_DEFAULT_CONFIG, **config}
        if c["resolution"] % c["patch_size"]:
            raise ValueError(f"resolution={c['resolution']} must be a multiple of patch_size={c['patch_size']}")
        width = c["num_attention_heads"] * c["attention_head_dim"]
        transformer = PixArtTransformerMV2DModel.from_config(
            dict(
                num_attention_heads=c["num_attention_heads"],
                attention_head_dim=c["attention_head_dim"],
                in_channels=SPLATTER_CHANNELS + 6,  # splatter latents + Plücker rays
                out_channels=SPLATTER_CHANNELS,  # ε only
                num_layers=c["num_layers"],
                cross_attention_dim=width,
                sample_size=c["resolution"],
                patch_size=c["patch_size"],
                caption_channels=c["caption_channels"],
                norm_type="ada_norm_single",
                use_additional_conditions=False,
                interpolation_scale=1,
            )
        )
        prompt_encoder = PromptTokenEncoder(vocab=world_vocabulary(), caption_channels=c["caption_channels"])
        return cls(transformer, prompt_encoder, num_views=c["num_views"],
                   scheduler_config={**TINY_SCHEDULER_CONFIG, **(scheduler_config or {})})

    def _denoise(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """ε (B, V, 12, h, w) = (x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t), from the transformer's x̂0 (module docstring)."""
        x0 = super()._denoise(latents, t, embeds)  # (B, V, 12, h, w)
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        return ((latents.float() - alpha_bar.sqrt() * x0.float()) / (1 - alpha_bar).sqrt()).to(latents.dtype)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        return self.prompt_encoder(prompts)

    def negative_embeds(self, batch_size: int) -> PromptEmbeds:
        return self.prompt_encoder([""] * batch_size)

    def latents_to_splatter(self, latents: torch.Tensor) -> torch.Tensor:
        # The latents are the splatter images; clamp like DiffSplat's VAE decode does.
        return latents.clamp(-1.0, 1.0)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        self._check_saveable()
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(root / "transformer")
        self.prompt_encoder.save_pretrained(root / "prompt_encoder")
        DPMSolverMultistepScheduler.from_config(self.scheduler_config).save_config(root / SCHEDULER_DIR)
        config = {"_class_name": type(self).__name__, "num_views": self.num_views}
        (root / GENERATOR_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> "TinySplatGenerator":
        root = require_files(pretrained_path, CHECKPOINT_FILES, how_to_get=HOW_TO_GET)
        config = json.loads((root / GENERATOR_CONFIG_NAME).read_text())
        transformer = PixArtTransformerMV2DModel.from_pretrained(root / "transformer", torch_dtype=torch_dtype)
        prompt_encoder = PromptTokenEncoder.from_pretrained(root / "prompt_encoder", torch_dtype=torch_dtype)
        return cls(transformer, prompt_encoder, num_views=config["num_views"], scheduler_config=load_scheduler_config(root))
