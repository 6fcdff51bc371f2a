"""The interface of the splat generators (the tiny prior and DiffSplat), in diffusers' style.

A generator bundles the parts of a 3D-native text-to-splat diffusion model: the denoiser (a
multi-view PixArt transformer, the module LoRA adapts), a prompt encoder, the camera ``rig`` whose
Plücker rays condition the denoiser and whose views the splatter images are unprojected from, the
latent-to-splatter decoder, and the noise schedule as a plain ``scheduler_config`` dict (kwargs
for diffusers' ``DPMSolverMultistepScheduler``; the samplers in ``models/schedulers.py`` own the
sampling). Like a diffusers pipeline it offers ``from_pretrained``/``save_pretrained``, but the
denoising loop lives in the samplers and algorithms, which call :meth:`SplatGenerator.predict`.

Conventions: latents are ``(B, V, C, h, w)``; the V views of an object share one timestep and
one prompt. The raw network output is ``(B, V, C_out, h, w)``; ``C_out = 2C`` for learned-sigma
models (DiffSplat), whose first C channels are ε. Classifier-free guidance runs the unconditional
and conditional branches in one batched forward and combines *all* output channels,
``out_u + g·(out_c − out_u)``, as DiffSplat's pipeline does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import nn

from r2d3ray.errors import UserError
from r2d3ray.models.lora import adapter_parameters, adapters_disabled, use_adapter
from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel, set_mv_attention
from r2d3ray.render.cameras import Cameras
from r2d3ray.splats import Splats, decode_splatter_images

SCHEDULER_DIR = "scheduler"


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint file is missing; the message names the path looked for and how to get it."""


def require_files(root: str | os.PathLike, relative_paths: list[str], how_to_get: str) -> Path:
    """Check that every ``root/relative_path`` exists; raise :class:`CheckpointNotFoundError` otherwise."""
    root = Path(root)
    for relative in relative_paths:
        path = root / relative
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"checkpoint file not found: looked for {path} (expected '{relative}' under {root}). {how_to_get}"
            )
    return root


def load_scheduler_config(root: str | os.PathLike) -> dict:
    """``root/scheduler/scheduler_config.json`` as kwargs for ``DPMSolverMultistepScheduler``."""
    path = Path(root) / SCHEDULER_DIR
    config = DPMSolverMultistepScheduler.load_config(str(path))
    return {key: value for key, value in config.items() if not key.startswith("_")}


@dataclass
class PromptEmbeds:
    """Encoded prompts: ``embeds (B, L, D)`` and ``mask (B, L)`` (1/True = real token)."""

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L)

    def __post_init__(self):
        if self.embeds.ndim != 3 or self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"PromptEmbeds: expected embeds (B, L, D) and mask (B, L), got {tuple(self.embeds.shape)} "
                f"and {tuple(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        """Move both tensors to ``device``; ``dtype`` applies to the embeddings only."""
        return PromptEmbeds(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device))

    def __getitem__(self, index) -> "PromptEmbeds":
        """Select prompts (int, slice or index tensor); the batch dim is kept."""
        if isinstance(index, int):
            index = slice(index, index + 1 or None)
        return PromptEmbeds(self.embeds[index], self.mask[index])

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch; all items must share L and D."""
        shapes = {tuple(item.embeds.shape[1:]) for item in items}
        if len(shapes) != 1:
            raise ValueError(f"PromptEmbeds.cat: embeddings must share (L, D), got {sorted(shapes)}")
        return PromptEmbeds(torch.cat([i.embeds for i in items]), torch.cat([i.mask for i in items]))


class SplatGenerator(nn.Module):
    """Base class of the text-to-splat generators.

    Subclasses set the prompt encoder and decoder and implement :meth:`encode_prompts`,
    :meth:`negative_embeds`, :meth:`latents_to_splatter`, :meth:`save_pretrained` and
    :meth:`from_pretrained`. The base class owns the denoiser call (Plücker conditioning,
    multi-view attention, CFG), shared by both.
    """

    def __init__(
        self,
        denoiser: PixArtTransformerMV2DModel,
        rig: Cameras,
        plucker: torch.Tensor,  # (V, 6, h, w) at the latent resolution
        latent_channels: int,
        scheduler_config: dict,
        upcast_softmax: bool = False,
    ):
        super().__init__()
        if not isinstance(denoiser, PixArtTransformerMV2DModel):
            raise ValueError(f"denoiser: expected a PixArtTransformerMV2DModel, got {type(denoiser).__name__}")
        V = rig.num_views
        if plucker.shape[:2] != (V, 6):
            raise ValueError(f"plucker: expected shape ({V}, 6, h, w) for a {V}-view rig, got {tuple(plucker.shape)}")
        expected_in = latent_channels + 6
        if denoiser.config.in_channels != expected_in:
            raise ValueError(
                f"denoiser: in_channels={denoiser.config.in_channels}, expected {latent_channels} latent "
                f"+ 6 Plücker = {expected_in}"
            )
        if denoiser.out_channels not in (latent_channels, 2 * latent_channels):
            raise ValueError(
                f"denoiser: out_channels={denoiser.out_channels}, expected {latent_channels} (ε) or "
                f"{2 * latent_channels} (ε + learned variance)"
            )
        self.denoiser = set_mv_attention(denoiser, upcast_softmax=upcast_softmax)
        # The rig's tensors are buffers so that `generator.to(device)` moves them with the weights.
        self.register_buffer("rig_viewmats", rig.viewmats.float(), persistent=False)  # (V, 4, 4)
        self.register_buffer("rig_Ks", rig.Ks.float(), persistent=False)  # (V, 3, 3)
        self.rig_size = (rig.width, rig.height)
        self.register_buffer("plucker", plucker.float(), persistent=False)  # (V, 6, h, w)
        self.latent_channels = latent_channels
        self.scheduler_config = dict(scheduler_config)

    @property
    def rig(self) -> Cameras:
        """The V input cameras (float32, on the generator's device): the Plücker rays' and the views
        the splatter images are unprojected from."""
        return Cameras(self.rig_viewmats.float(), self.rig_Ks.float(), *self.rig_size)

    @property
    def num_views(self) -> int:
        return self.rig_viewmats.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(V, C, h, w) of one object's latents."""
        return (self.num_views, self.latent_channels, *self.plucker.shape[-2:])

    @property
    def device(self) -> torch.device:
        return self.plucker.device

    # ------------------------------------------------------------------ to implement

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def negative_embeds(self, batch_size: int) -> PromptEmbeds:
        """The embedding of the empty prompt "", repeated ``batch_size`` times."""
        raise NotImplementedError

    def latents_to_splatter(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, V, C, h, w) -> splatter images (B, V, 12, H, W) in [-1, 1]."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, **kwargs) -> "SplatGenerator":
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def _check_saveable(self) -> None:
        # peft wraps the adapted layers (`to_q.base_layer`), so the saved config would not load back.
        if getattr(self.denoiser, "peft_config", None):
            raise ValueError(
                f"save_pretrained: the denoiser carries LoRA adapters {sorted(self.denoiser.peft_config)}; "
                "save them with r2d3ray.models.lora.save_lora and the base model before adding them"
            )

    def predict(
        self,
        latents: torch.Tensor,  # (B, V, C, h, w)
        t: torch.Tensor | int,  # (B,) or scalar training timesteps
        embeds: PromptEmbeds,
        guidance_scale: float = 1.0,
        negative: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        """Raw denoiser output (B, V, C_out, h, w) in ``latents``' dtype, with CFG when ``guidance_scale != 1``.

        ``negative`` defaults to :meth:`negative_embeds` (the "" prompt).
        """
        if latents.ndim != 5 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents: expected shape (B, {', '.join(map(str, self.latent_shape))}), got {tuple(latents.shape)}")
        B = latents.shape[0]
        if embeds.batch_size != B:
            raise ValueError(f"embeds: batch size {embeds.batch_size} does not match latents' {B}")
        t = torch.as_tensor(t, device=latents.device).long()
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t: expected a scalar or shape ({B},), got {tuple(t.shape)}")
        if guidance_scale == 1.0:
            return self._denoise(latents, t, embeds)

        negative = self.negative_embeds(B) if negative is None else negative
        if negative.batch_size != B:
            raise ValueError(f"negative: batch size {negative.batch_size} does not match latents' {B}")
        negative = negative.to(embeds.embeds.device, embeds.embeds.dtype)
        raw = self._denoise(torch.cat([latents, latents]), torch.cat([t, t]), PromptEmbeds.cat([negative, embeds]))
        uncond, cond = raw.chunk(2)  # (B, V, C_out, h, w) each
        return uncond + guidance_scale * (cond - uncond)

    def _denoise(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """One batched forward: (B, V, C, h, w) -> (B, V, C_out, h, w)."""
        B, V = latents.shape[:2]
        dtype = self.denoiser.dtype
        plucker = self.plucker.to(dtype).expand(B, -1, -1, -1, -1)  # (B, V, 6, h, w)
        x = torch.cat([latents.to(dtype), plucker], dim=2).flatten(0, 1)  # (B·V, C+6, h, w)
        # Every view of an object sees the object's prompt and timestep.
        out = self.denoiser(
            x,
            encoder_hidden_states=embeds.embeds.to(x.device, dtype).repeat_interleave(V, dim=0),  # (B·V, L, D)
            encoder_attention_mask=embeds.mask.to(x.device).repeat_interleave(V, dim=0),  # (B·V, L)
            timestep=t.repeat_interleave(V),  # (B·V,)
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            cross_attention_kwargs={"num_views": V},
            return_dict=False,
        )[0]
        return out.unflatten(0, (B, V)).to(latents.dtype)  # (B, V, C_out, h, w)

    # The policy's adapters, as the alignment algorithms ask for them (r2d3ray/train/updates.py):
    # the trained LoRA and its copies live on the denoiser, whichever generator holds it.

    def use_adapter(self, name: str):
        """Context manager (or plain call) making LoRA adapter ``name`` the active one."""
        return use_adapter(self.denoiser, name)

    def adapters_disabled(self):
        """Context manager running the frozen base model: the reference policy."""
        return adapters_disabled(self.denoiser)

    def adapter_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        """Adapter ``name``'s parameters under adapter-agnostic keys (the same key in every adapter)."""
        return adapter_parameters(self.denoiser, name)

    def eps_from_output(self, raw: torch.Tensor) -> torch.Tensor:
        """ε (B, V, C, h, w) from a raw output: its first C channels (all of them without learned sigma)."""
        if raw.ndim != 5 or raw.shape[2] not in (self.latent_channels, 2 * self.latent_channels):
            raise ValueError(
                f"raw: expected shape (B, V, {self.latent_channels} or {2 * self.latent_channels}, h, w), got {tuple(raw.shape)}"
            )
        return raw[:, :, : self.latent_channels]

    def latents_to_splats(self, latents: torch.Tensor) -> Splats:
        """Latents (B, V, C, h, w) -> Splats with N = V·H·W, unprojected from the rig's views."""
        return decode_splatter_images(self.latents_to_splatter(latents), self.rig.c2w.to(latents.device))
