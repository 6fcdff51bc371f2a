"""CLIP-style image preprocessing in torch, and the Hugging Face CLIP loader, shared by the CLIP rewards.

The official pipelines go through PIL (uint8 image, bicubic resize, ToTensor, normalise), which
cuts the graph. This is the same computation on float tensors, so reward gradients reach the
pixels: torch's antialiased bicubic uses PIL's kernel (a = -0.5), and for square renders HPSv2's
``ResizeMaxSize`` and CLIP's resize + centre crop are both a plain resize. ``clip_preprocess``
(HPSv2, aesthetic) stretches non-square inputs to the model's square size; ``resize_crop_normalize``
(PickScore, CLIPScore, ImageReward) resizes the shorter side and centre-crops, as CLIP's
``Resize(n) + CenterCrop(n)`` and Hugging Face's ``CLIPImageProcessor`` do. (Nabla-R2D3's aesthetic
reward resizes without antialiasing; we follow the official pipelines instead.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def resize_crop_normalize(
    images: torch.Tensor,
    shortest_edge: int,
    crop: int,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> torch.Tensor:
    """images (N, 3, H, W) in [0, 1] -> (N, 3, crop, crop): the shorter side resized to
    ``shortest_edge`` (bicubic, antialias), the centre ``crop`` x ``crop`` cut out, normalised with
    ``mean``/``std``. Differentiable and unclamped, like ``clip_preprocess``; on square renders with
    ``shortest_edge == crop`` the two agree."""
    H, W = images.shape[-2:]
    scale = shortest_edge / min(H, W)
    # torchvision's Resize(int) and CLIPImageProcessor round the longer side down (int()); so do we.
    resized = (shortest_edge, int(W * scale)) if H <= W else (int(H * scale), shortest_edge)
    x = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False)
    # torchvision's CenterCrop offsets: round((size - crop) / 2).
    top, left = round((x.shape[-2] - crop) / 2), round((x.shape[-1] - crop) / 2)
    x = x[..., top : top + crop, left : left + crop]
    return (x - x.new_tensor(mean).view(3, 1, 1)) / x.new_tensor(std).view(3, 1, 1)


def load_hf_clip(checkpoint: str | Path, processor: str | Path | None, reward: str, weights_hint: str):
    """(CLIPModel, tokenizer, ClipPixels) from local Hugging Face directories only.

    checkpoint: a ``CLIPModel`` directory (config.json + model.safetensors or pytorch_model.bin);
    processor: the directory of its tokenizer and ``preprocessor_config.json`` (default: checkpoint).
    ``reward`` and ``weights_hint`` (the Hugging Face repos to fetch) go into the error messages.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model_dir = Path(checkpoint).expanduser()
    processor_dir = Path(processor).expanduser() if processor else model_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{reward}: no CLIPModel config.json in {model_dir}. It needs a local Hugging Face CLIPModel directory "
            f"(config.json + model.safetensors): on a machine with internet run `huggingface-cli download "
            f"{weights_hint}` and pass the directories."
        )
    if not (processor_dir / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{reward}: no preprocessor_config.json (nor tokenizer files) in the processor directory {processor_dir}; "
            f"download the processor repo named in {weights_hint!r} and pass processor=DIR."
        )
    # local_files_only: a missing file is an error here, never a download.
    # Reward math is float32 whatever dtype the weights were saved in (PickScore ships fp32, others fp16).
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).float()
    tokenizer = AutoTokenizer.from_pretrained(processor_dir, local_files_only=True)
    image_processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
    crop = dict(image_processor.crop_size)
    if crop["height"] != crop["width"] or "shortest_edge" not in image_processor.size:
        raise ValueError(f"{reward}: {processor_dir}/preprocessor_config.json has size {image_processor.size} and "
                         f"crop_size {crop}; CLIP resizes the shortest edge and crops a square")
    pixels = ClipPixels(image_processor.size["shortest_edge"], crop["height"],
                        tuple(image_processor.image_mean), tuple(image_processor.image_std))
    return model.requires_grad_(False).eval(), tokenizer, pixels


@dataclass(frozen=True)
class ClipPixels:
    """How a CLIP model wants its pixels: ``resize_crop_normalize`` with these arguments."""

    shortest_edge: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> (N, 3, crop, crop), differentiable."""
        return resize_crop_normalize(images, self.shortest_edge, self.crop, self.mean, self.std)


def hf_clip_features(model, tokenizer, pixels: ClipPixels, images: torch.Tensor, prompts: list[str]):
    """L2-normalised CLIP embeddings: images (N, 3, H, W) in [0, 1] -> (N, D); prompts (P,) -> (P, D).

    Tokenised as the originals' ``processor(text=..., padding=True, truncation=True, max_length=77)``.
    The projections are applied here rather than through ``get_*_features``, whose return type
    changed between transformers 4 and 5."""
    image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels(images)).pooler_output)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(images.device)
    text_embeds = model.text_projection(
        model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    )
    return F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
