"""CLIP image preprocessing in torch, shared by the HPSv2 and aesthetic rewards.

The official pipelines go through PIL (uint8 image, bicubic resize, ToTensor, normalise), which
cuts the graph. This is the same computation on float tensors, so reward gradients reach the
pixels: torch's antialiased bicubic uses PIL's kernel (a = -0.5), and for square renders HPSv2's
``ResizeMaxSize`` and CLIP's resize + centre crop are both a plain resize. Non-square inputs are
stretched to the model's square size rather than padded or cropped. (Nabla-R2D3's aesthetic reward
resizes without antialiasing; we follow the official pipelines instead.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def clip_preprocess(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """images (N, 3, H, W) in [0, 1] -> (N, 3, *size) resized (bicubic, antialias) and normalised
    with the OpenAI CLIP mean/std. Differentiable; no clamping after the resize (bicubic may
    overshoot [0, 1] slightly, where PIL would clip, and clipping would zero those gradients)."""
    x = F.interpolate(images, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    mean = x.new_tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = x.new_tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    return (x - mean) / std
