"""HPSv2 (Human Preference Score v2) as a differentiable reward.

HPSv2 is an open_clip ViT-H-14 fine-tuned on human preferences. We build the architecture with
plain ``open_clip_torch`` (the ``hpsv2`` wheel lacks its BPE vocabulary and is not
differentiable) and load the HPS checkpoint from a local file through open_clip's own loader, which
reads ``checkpoint["state_dict"]`` or a bare state dict and strips a ``module.`` prefix. The score
of a view is the cosine between its L2-normalised image features and the prompt's L2-normalised
text features, with no logit scale (``hpsv2/img_score.py``): typically 0.2-0.35, higher is better.
Scores of v2.0 and v2.1 are not comparable.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.clip_utils import clip_preprocess
from r2d3ray.rewards.registry import register_reward

# hps_version -> file in the Hugging Face repo xswu/HPSv2 (``hpsv2/utils.py``'s hps_version_map).
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@register_reward("hps")
class HPSv2Reward(RewardModel):
    """HPSv2 score of each view against its object's prompt, (B, V).

    checkpoint: the HPS checkpoint file, or a directory holding ``HPS_CHECKPOINTS[version]``;
    version: "v2.0" or "v2.1" (the reference Nabla-R2D3 uses v2.1);
    model_name, arch_overrides: the open_clip architecture and config overrides (e.g. ``embed_dim``,
    ``vision_cfg``, ``text_cfg``) passed to ``open_clip.create_model``; the defaults are HPSv2's.
    """

    name = "hps"

    def __init__(
        self,
        checkpoint: str | Path,
        version: str = "v2.1",
        model_name: str = "ViT-H-14",
        arch_overrides: dict | None = None,
    ):
        super().__init__()
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"hps: version={version!r}; expected one of {sorted(HPS_CHECKPOINTS)}")
        path = Path(checkpoint).expanduser()
        filename = HPS_CHECKPOINTS[version]
        if path.is_dir():
            path = path / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"hps: HPSv2 {version} checkpoint not found at {path}. It is {filename} in the Hugging Face "
                f"repo xswu/HPSv2; on a machine with internet run `huggingface-cli download xswu/HPSv2 "
                f"{filename} --local-dir DIR` and pass checkpoint=DIR/{filename} (or DIR)."
            )
        # pretrained=<file path> loads it strictly into the freshly built model; nothing is downloaded.
        self.model = open_clip.create_model(model_name, pretrained=str(path), **(arch_overrides or {}))
        self.model.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.model.context_length)

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        pixels = clip_preprocess(images.flatten(0, 1), self.model.visual.image_size)  # (B*V, 3, 224, 224)
        image_features = self.model.encode_image(pixels, normalize=True).view(B, V, -1)  # (B, V, D)
        tokens = self.tokenizer(prompts).to(images.device)  # (B, 77)
        text_features = self.model.encode_text(tokens, normalize=True)  # (B, D)
        return (image_features * text_features[:, None]).sum(-1)  # (B, V)
