"""The base model a run config names (`cfg.model`), loaded frozen: one place for the trainer,
inference, evaluation and the CLI."""

from __future__ import annotations

from pathlib import Path

import torch

from r2d3ray.config import R2D3Config

TINY_PRIOR_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_prior"  # the committed tiny prior


def load_generator(cfg: R2D3Config):
    """The base model named by `cfg.model`, frozen; LoRA adapters are added by the caller."""
    if cfg.model.kind == "tiny":
        from r2d3ray.models.tiny import TinySplatGenerator

        generator = TinySplatGenerator.from_pretrained(cfg.model.path or TINY_PRIOR_DIR)
    else:
        from r2d3ray.models.diffsplat import DiffSplatGenerator

        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        generator = DiffSplatGenerator.from_pretrained(cfg.model.path, torch_dtype=dtype,
                                                       upcast_softmax=cfg.model.fp32_softmax)
    return generator.requires_grad_(False)
