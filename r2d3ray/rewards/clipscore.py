"""CLIPScore (Hessel et al., 2021) as a differentiable reward.

``w · max(cos(image embedding, caption embedding), 0)`` with w = 2.5 and the caption prefixed with
"A photo depicts ", as the paper and its reference code (jmhessel/clipscore) compute it: in [0, 2.5],
higher is better. torchmetrics' ``CLIPScore`` is the same cosine with w = 100 and no prefix
(``weight=100, prompt_prefix=""`` reproduces it; benchmarks/README.md). The paper uses OpenAI
ViT-B/32, torchmetrics defaults to ViT-L/14; any Hugging Face ``CLIPModel`` directory works.

Where the cosine is negative the score is 0 and so is its gradient: on a view that far from its
prompt this reward gives a gradient-based trainer nothing to follow.
"""

from __future__ import annotations

from pathlib import Path

from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.clip_utils import hf_clip_features, load_hf_clip
from r2d3ray.rewards.registry import register_reward

CLIPSCORE_WEIGHTS = "openai/clip-vit-base-patch32 (the paper's) or openai/clip-vit-large-patch14 (torchmetrics')"


@register_reward("clipscore")
class CLIPScoreReward(RewardModel):
    """CLIPScore of each view against its object's prompt, (B, V).

    checkpoint: local Hugging Face ``CLIPModel`` directory; processor: its tokenizer files and
    preprocessor_config.json (default: ``checkpoint``, where the openai/clip-* repos keep them);
    weight: w (2.5 as Hessel et al.; 100 as torchmetrics); prompt_prefix: put before every prompt.
    """

    name = "clipscore"

    def __init__(self, checkpoint: str | Path, processor: str | Path | None = None, weight: float = 2.5,
                 prompt_prefix: str = "A photo depicts "):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"clipscore: weight={weight!r}; expected a float > 0")
        self.model, self.tokenizer, self.pixels = load_hf_clip(checkpoint, processor, self.name, CLIPSCORE_WEIGHTS)
        self.weight = float(weight)
        self.prompt_prefix = prompt_prefix

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        captions = [self.prompt_prefix + prompt for prompt in prompts]
        image_embeds, text_embeds = hf_clip_features(self.model, self.tokenizer, self.pixels, images.flatten(0, 1),
                                                     captions)  # (B*V, D), (B, D)
        cosine = (image_embeds.view(B, V, -1) * text_embeds[:, None]).sum(-1)  # (B, V)
        return self.weight * cosine.clamp(min=0)
