"""The LAION "improved aesthetic predictor" as a differentiable reward.

OpenAI CLIP ViT-L/14 image embedding, L2-normalised, then the LAION MLP head
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations), trained on AVA ratings: the score is on the
1-10 scale, higher is better. The head weights are vendored (Apache-2.0, see
``r2d3ray/assets/laion_aesthetic/``); the CLIP backbone is loaded from a local file through
open_clip, which builds OpenAI checkpoints with QuickGELU as they were trained.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.clip_utils import clip_preprocess
from r2d3ray.rewards.registry import register_reward

LAION_HEAD = Path(__file__).resolve().parents[1] / "assets" / "laion_aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"


@register_reward("aesthetic")
class AestheticReward(RewardModel):
    """LAION aesthetic score of each view, (B, V); prompts are ignored.

    clip_checkpoint: OpenAI CLIP ViT-L/14 weights, either OpenAI's TorchScript ``ViT-L-14.pt`` or a
    plain state dict in the OpenAI/open_clip key layout (``.pt``/``.bin``, not safetensors);
    head_checkpoint: the LAION head state dict (default: the vendored file).
    """

    name = "aesthetic"

    def __init__(self, clip_checkpoint: str | Path, head_checkpoint: str | Path = LAION_HEAD):
        super().__init__()
        clip_path, head_path = Path(clip_checkpoint).expanduser(), Path(head_checkpoint).expanduser()
        if not clip_path.is_file():
            raise FileNotFoundError(
                f"aesthetic: CLIP ViT-L/14 checkpoint not found at {clip_path}. On a machine with internet "
                f"download OpenAI's ViT-L-14.pt ({open_clip.get_pretrained_url('ViT-L-14', 'openai')}) or "
                "open_clip_pytorch_model.bin from the Hugging Face repo timm/vit_large_patch14_clip_224.openai, "
                "and pass its path as clip_checkpoint."
            )
        if not head_path.is_file():
            raise FileNotFoundError(
                f"aesthetic: LAION head not found at {head_path}; the package ships it as {LAION_HEAD} "
                "(sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor)."
            )
        with warnings.catch_warnings():  # open_clip first tries torch.jit.load, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            clip = open_clip.load_openai_model(str(clip_path), precision="fp32", device="cpu")
        self.visual = clip.visual.requires_grad_(False).eval()  # the text tower is not needed
        if self.visual.output_dim != 768:
            raise ValueError(
                f"aesthetic: {clip_path} has {self.visual.output_dim}-d image embeddings; the LAION head "
                "takes ViT-L/14's 768-d ones"
            )
        state = torch.load(head_path, map_location="cpu", weights_only=True)  # saved on cuda:0
        # Indexed as in the checkpoint (layers.{0,2,4,6,7}). The dropout slots 1, 3, 5 are Identity:
        # that is what dropout is in eval mode, and a later train() cannot switch it on.
        self.head = nn.Sequential(
            nn.Linear(768, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
            nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1),
        )
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        self.head.requires_grad_(False)

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        pixels = clip_preprocess(images.flatten(0, 1), self.visual.image_size)  # (B*V, 3, 224, 224)
        embeddings = F.normalize(self.visual(pixels), dim=-1)  # (B*V, 768)
        return self.head(embeddings).view(B, V)
