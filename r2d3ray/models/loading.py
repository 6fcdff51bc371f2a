"""The base model a run config names (`cfg.model`), loaded frozen: one place for the trainer,
inference, evaluation and the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from r2d3ray.config import R2D3Config

TINY_PRIOR_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_prior"  # the committed tiny prior


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: "auto" is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"model.device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device {name!r}: this machine has no CUDA device; use 'auto' or 'cpu'")
    return device


def model_directory(cfg: R2D3Config) -> Path:
    """The base model's directory: ``model.path``, or for the tiny prior by default the committed one."""
    return Path(cfg.model.path) if cfg.model.path or cfg.model.kind != "tiny" else TINY_PRIOR_DIR


def missing_model_files(cfg: R2D3Config) -> list[str]:
    """The files ``load_generator`` would read and does not find, one entry per component (empty: complete)."""
    root = model_directory(cfg)
    if cfg.model.kind == "tiny":
        from r2d3ray.models.tiny import CHECKPOINT_FILES

        return [str(root / relative) for relative in CHECKPOINT_FILES if not (root / relative).is_file()]
    from r2d3ray.models.diffsplat import missing_checkpoint_files

    return missing_checkpoint_files(root)


def load_generator(cfg: R2D3Config, device: str | torch.device | None = None):
    """The base model named by `cfg.model`, frozen, on ``device`` (default: ``cfg.model.device``);
    LoRA adapters are added by the caller."""
    device = resolve_device(cfg.model.device) if device is None else torch.device(device)
    if cfg.model.kind == "tiny":
        from r2d3ray.models.tiny import TinySplatGenerator

        generator = TinySplatGenerator.from_pretrained(model_directory(cfg))
    else:
        from r2d3ray.models.diffsplat import DiffSplatGenerator

        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        generator = DiffSplatGenerator.from_pretrained(cfg.model.path, torch_dtype=dtype,
                                                       upcast_softmax=cfg.model.fp32_softmax)
    if cfg.model.gradient_checkpointing:
        generator.denoiser.enable_gradient_checkpointing()
    return generator.requires_grad_(False).to(device)


def _is_on(actual: torch.device, wanted: torch.device) -> bool:
    # "cuda" without an index stands for whichever CUDA device the tensors went to.
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def check_on_device(module: nn.Module, device: str | torch.device, what: str = "generator") -> None:
    """Stop (RuntimeError) naming the first parameter or buffer of ``module`` that is not on ``device``.

    A run calls it once its model is set up: a tensor left behind would otherwise fail deep inside
    the first forward pass, or silently run on the CPU."""
    device = torch.device(device)
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if not _is_on(tensor.device, device):
            raise RuntimeError(
                f"{what} tensor {name!r} is on {tensor.device}, not on the run's device {device}; everything the "
                f"{what} holds must be a parameter or buffer so that {what}.to(device) moves it"
            )
