"""ImageReward (Xu et al., 2023) as a differentiable reward.

The model of the ``ImageReward-v1.0`` checkpoint (THUDM/ImageReward): BLIP's ViT-L/16 encodes the
image, a BERT-base text encoder reads the prompt with cross-attention into the image tokens, and
an MLP head (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) maps the [CLS] output to a score
that is then standardised with the training set's mean and std: about -2..2, higher is better.

The ``image-reward`` package itself does not import next to r2d3ray's dependencies (it needs
transformers < 5 APIs, timm 0.6, fairscale and OpenAI's ``clip``), so the same network is built
from transformers' BLIP classes, which are ports of the BLIP code ImageReward vendors:
``BlipVisionModel`` for its timm-style ``VisionTransformer`` and ``BlipTextModel`` (with
cross-attention) for its ``med.BertModel``. The checkpoint's keys are renamed onto them one to
one and every weight the score uses must be there. tests/test_rewards_extra.py checks scores
against the package's own classes on the same weights wherever that package is importable.
Preprocessing is the package's ``Resize(224, bicubic) + CenterCrop(224)`` with the OpenAI CLIP
mean/std, in torch; prompts are tokenised as ``score`` does (BERT uncased, padded to 35 tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.clip_utils import resize_crop_normalize
from r2d3ray.rewards.registry import register_reward

CHECKPOINT_FILE, MED_CONFIG_FILE = "ImageReward.pt", "med_config.json"
# ImageReward.__init__: the standardisation of the head's output.
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
IMAGE_SIZE = 224  # ImageReward's BLIP_Pretrain(image_size=224) and _transform(224)
MAX_PROMPT_TOKENS = 35  # ImageReward.score: padding="max_length", truncation=True, max_length=35
# BLIP's ViTs (base and large) use 64-wide attention heads; the checkpoint does not record the count.
VISION_HEAD_DIM = 64
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
WEIGHTS_HINT = ("`huggingface-cli download THUDM/ImageReward ImageReward.pt med_config.json --local-dir DIR` "
                "and `huggingface-cli download bert-base-uncased vocab.txt tokenizer_config.json --local-dir TOKENIZER`")
# Inside a ViT block: timm VisionTransformer (BLIP's vit.py) names -> transformers BlipVisionModel names.
VISION_BLOCK_RENAMES = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.qkv.": "self_attn.qkv.",
                        "attn.proj.": "self_attn.projection.", "mlp.": "mlp."}
VISION_TOP_RENAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                      "patch_embed.proj.": "embeddings.patch_embedding.", "norm.": "post_layernorm."}


def blip_vision_state(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blip.visual_encoder.*`` of an ImageReward checkpoint, renamed to BlipVisionModel's keys."""
    renamed = {}
    for key, value in checkpoint.items():
        if not key.startswith("blip.visual_encoder."):
            continue
        key = key.removeprefix("blip.visual_encoder.")
        if key.startswith("blocks."):  # blocks.{i}.{rest}
            _, index, rest = key.split(".", 2)
            old = next((old for old in VISION_BLOCK_RENAMES if rest.startswith(old)), None)
            if old is None:
                raise ValueError(f"imagereward: unexpected vision weight blip.visual_encoder.{key}")
            key = f"encoder.layers.{index}.{VISION_BLOCK_RENAMES[old]}{rest.removeprefix(old)}"
        else:
            old = next((old for old in VISION_TOP_RENAMES if key == old or (old.endswith(".") and key.startswith(old))),
                       None)
            if old is None:
                raise ValueError(f"imagereward: unexpected vision weight blip.visual_encoder.{key}")
            key = VISION_TOP_RENAMES[old] + key.removeprefix(old)
        renamed[key] = value
    return renamed


def blip_vision_config(vision_state: dict[str, torch.Tensor]):
    """The BlipVisionConfig of the ViT whose (renamed) weights these are; the checkpoint has no config."""
    from transformers import BlipVisionConfig

    hidden = vision_state["embeddings.class_embedding"].shape[-1]
    patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    patches_per_side = math.isqrt(vision_state["embeddings.position_embedding"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=hidden, intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // VISION_HEAD_DIM), image_size=patch * patches_per_side,
        patch_size=patch, hidden_act="gelu", layer_norm_eps=VISION_LAYER_NORM_EPS, attention_dropout=0.0,
    )


def blip_text_config(med_config: dict, encoder_width: int):
    """BlipTextConfig from ImageReward's med_config.json (a BertConfig), cross-attending to ``encoder_width``."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width, intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], hidden_act=med_config["hidden_act"],
        layer_norm_eps=med_config["layer_norm_eps"], pad_token_id=med_config.get("pad_token_id", 0),
        # is_decoder builds the cross-attention layers (med.py's add_cross_attention); the forward
        # below runs them bidirectionally (is_decoder=False), as ImageReward's "multimodal" mode.
        is_decoder=True,
    )


@register_reward("imagereward")
class ImageRewardReward(RewardModel):
    """ImageReward score of each view against its object's prompt, (B, V).

    checkpoint: ``ImageReward.pt``, or the directory holding it and ``med_config.json`` (the layout
    of the Hugging Face repo THUDM/ImageReward); med_config: that file if it is elsewhere;
    tokenizer: directory of the bert-base-uncased tokenizer (vocab.txt, tokenizer_config.json).
    """

    name = "imagereward"

    def __init__(self, checkpoint: str | Path, tokenizer: str | Path, med_config: str | Path | None = None):
        super().__init__()
        from transformers import BertTokenizer
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        path = Path(checkpoint).expanduser()
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        config_path = Path(med_config).expanduser() if med_config else path.parent / MED_CONFIG_FILE
        tokenizer_dir = Path(tokenizer).expanduser()
        for needed, what in ((path, "checkpoint"), (config_path, "med_config"), (tokenizer_dir / "vocab.txt", "tokenizer")):
            if not needed.is_file():
                raise FileNotFoundError(f"imagereward: {what} file not found at {needed}. On a machine with internet "
                                        f"run {WEIGHTS_HINT}; pass checkpoint=DIR, tokenizer=TOKENIZER.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        vision_state = blip_vision_state(state)
        self.visual_encoder = BlipVisionModel(blip_vision_config(vision_state))
        self.visual_encoder.load_state_dict(vision_state)
        text_prefix = "blip.text_encoder."
        text_state = {k.removeprefix(text_prefix): v for k, v in state.items()
                      if k.startswith(text_prefix) and not k.endswith("position_ids")}  # a buffer older transformers saved
        text_config = blip_text_config(json.loads(config_path.read_text()), self.visual_encoder.config.hidden_size)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.text_encoder.load_state_dict(text_state)
        # Indexed as in the checkpoint (mlp.layers.{0,2,4,6,7}); the dropout slots are Identity,
        # which is what they are in eval mode.
        self.head = nn.Sequential(
            nn.Linear(text_config.hidden_size, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
            nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1),
        )
        self.head.load_state_dict({k.removeprefix("mlp.layers."): v for k, v in state.items() if k.startswith("mlp.")})
        self.requires_grad_(False).eval()
        self.float()  # the released checkpoint is fp32, a converted one may not be
        # ImageReward's init_tokenizer: bert-base-uncased plus BLIP's [DEC] and [ENC] tokens (ids 30522, 30523).
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        image_size = self.visual_encoder.config.image_size
        pixels = resize_crop_normalize(images.flatten(0, 1), image_size, image_size)  # (B*V, 3, 224, 224)
        image_tokens = self.visual_encoder(pixel_values=pixels).last_hidden_state  # (B*V, 1 + patches, 1024)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(images.device)
        # Every view of object b reads prompt b: (B, 35) -> (B*V, 35).
        input_ids = tokens["input_ids"].repeat_interleave(V, dim=0)
        attention_mask = tokens["attention_mask"].repeat_interleave(V, dim=0)
        text = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device),
            is_decoder=False,
        ).last_hidden_state  # (B*V, 35, 768)
        scores = self.head(text[:, 0])  # (B*V, 1), from [CLS]
        return ((scores - SCORE_MEAN) / SCORE_STD).view(B, V)
