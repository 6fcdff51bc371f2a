"""PickScore as a differentiable reward.

PickScore (Kirstain et al., 2023) is CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences,
released in the Hugging Face ``CLIPModel`` layout (yuvalkirstain/PickScore_v1) and used with the
processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. As the original scoring code does, a view's
score is ``logit_scale.exp() · cos(image embedding, prompt embedding)``: typically about 18-23,
higher is better. Preprocessing is ``CLIPImageProcessor``'s (shortest side to 224, centre crop,
OpenAI mean/std) done in torch so the gradient reaches the pixels.
"""

from __future__ import annotations

from pathlib import Path

from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.clip_utils import hf_clip_features, load_hf_clip
from r2d3ray.rewards.registry import register_reward

PICKSCORE_WEIGHTS = "yuvalkirstain/PickScore_v1 (model) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (processor)"


@register_reward("pickscore")
class PickScoreReward(RewardModel):
    """PickScore of each view against its object's prompt, (B, V).

    checkpoint: local directory of yuvalkirstain/PickScore_v1 (config.json + model.safetensors);
    processor: local directory with the tokenizer files and preprocessor_config.json of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default: ``checkpoint``, if it holds them too).
    """

    name = "pickscore"

    def __init__(self, checkpoint: str | Path, processor: str | Path | None = None):
        super().__init__()
        self.model, self.tokenizer, self.pixels = load_hf_clip(checkpoint, processor, self.name, PICKSCORE_WEIGHTS)

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        image_embeds, text_embeds = hf_clip_features(self.model, self.tokenizer, self.pixels, images.flatten(0, 1),
                                                     prompts)  # (B*V, D), (B, D)
        cosine = (image_embeds.view(B, V, -1) * text_embeds[:, None]).sum(-1)  # (B, V)
        return self.model.logit_scale.exp() * cosine
