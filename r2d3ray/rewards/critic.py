"""``tiny_critic``: a learned 2D critic of the tiny world, the embedded default's stand-in for HPSv2.

HPSv2 is a frozen image model, trained on human preferences, that scores how well a picture shows its
prompt. The tiny world has no humans but knows its exact answer, so its critic is trained on 2D
renders only (``rewards/critic_train.py``): the world's ground-truth objects from random views are
the preferred images, against renders of other objects (wrong shape, colour, size or attribute for
the prompt) and degraded ones (blurred, hazy, scaled, fragmented, jittered splats: the tiny prior's
typical failures). Like HPSv2 it is prompt-aware and differentiable with respect to the pixels; unlike
it, it knows nothing outside the world (a prompt outside its vocabulary is a ValueError).

Architecture (:class:`TinyCritic`, 445 k parameters, 1.8 MB of float32): a plain-torch CNN whose
feature maps are modulated (FiLM) by an embedding of the prompt's words. Why a CNN and not a small
ViT: the critic must judge local evidence (soft or ragged edges, holes, haze) as well as global shape
and size, and it must be trained from scratch in minutes on two CPU cores; a CNN's locality and
weight sharing learn that from a few thousand renders, where a ViT of the same size needs far more
data and steps. Prompt conditioning: a prompt of the world is one word per role (shape, size,
attribute, colour; size and attribute may be absent), so its embedding is the sum of one learned
vector per role, and FiLM lets each word gate the features that matter for it (colour early, shape
and size late). GroupNorm (per sample, no batch statistics) keeps every view's score independent of
the batch; SiLU, average pooling and the antialiased resize keep the score smooth in the pixels,
which is what a reward gradient needs.

The score of a view is the critic's logit: positive where it takes the view for a faithful render of
the prompt, negative otherwise (on held-out prompts ground truth scores about +0.6, the negatives and
the tiny prior's samples −2 to +0.3: see ``r2d3ray/assets/tiny_critic/README.md``). A logit, not a probability, because a sigmoid
saturates on exactly the poor samples whose gradient the alignment needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from r2d3ray.models.world import ATTRIBUTES, COLORS, SHAPES, SIZES, ObjectSpec, parse_prompt
from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.registry import register_reward

TINY_CRITIC_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_critic"  # the committed critic
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Each role's words, "" (no size word = medium, no attribute) included: the embedding table's rows.
ROLE_WORDS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "size": tuple(SIZES),
    "attribute": tuple(ATTRIBUTES),
    "color": tuple(COLORS),
}


def prompt_indices(prompts: list[str | ObjectSpec]) -> torch.Tensor:
    """(B, 4) long: each prompt's word index per role, in ``ROLE_WORDS`` order."""
    specs = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
    return torch.tensor([[ROLE_WORDS[role].index(getattr(spec, role)) for role in ROLE_WORDS] for spec in specs],
                        dtype=torch.long).view(len(specs), len(ROLE_WORDS))


class FiLMBlock(nn.Module):
    """conv -> GroupNorm -> (1 + γ(prompt)) · x + β(prompt) -> SiLU."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, stride: int):
        super().__init__()
        kernel = 4 if stride == 2 else 3  # an even kernel for the stride-2 halving keeps the grid aligned
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, out_channels)
        self.film = nn.Linear(embed_dim, 2 * out_channels)
        # Start as an unconditioned block (γ = β = 0): the prompt's influence is learned from there.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(prompt)[:, :, None, None].chunk(2, dim=1)  # each (N, C, 1, 1)
        return F.silu(self.norm(self.conv(x)) * (1 + gamma) + beta)


class TinyCritic(nn.Module):
    """Prompt-conditioned CNN: images (N, 3, H, W) in [0, 1] and word indices (N, 4) -> logits (N,).

    Images of any size are resized (bilinear, antialiased) to ``image_size`` first. Each of the
    ``widths`` stages halves the resolution (64 -> 32 -> 16 -> 8) and refines at that resolution.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), embed_dim: int = 64, image_size: int = 64):
        super().__init__()
        self.config = dict(widths=list(widths), embed_dim=embed_dim, image_size=image_size)
        self.image_size = image_size
        self.embeddings = nn.ModuleDict({role: nn.Embedding(len(words), embed_dim) for role, words in ROLE_WORDS.items()})
        blocks, previous = [], 3
        for width in widths:
            blocks += [FiLMBlock(previous, width, embed_dim, stride=2), FiLMBlock(width, width, embed_dim, stride=1)]
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Linear(previous + embed_dim, previous), nn.SiLU(), nn.Linear(previous, 1))

    def embed(self, words: torch.Tensor) -> torch.Tensor:
        """(N, 4) word indices -> (N, embed_dim), the sum of the roles' embeddings."""
        return sum(self.embeddings[role](words[:, i]) for i, role in enumerate(ROLE_WORDS))

    def forward(self, images: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        prompt = self.embed(words).to(images.dtype)  # (N, E)
        x = images * 2 - 1  # white background -> +1
        for block in self.blocks:
            x = block(x, prompt)
        pooled = x.mean((-2, -1))  # (N, C)
        return self.head(torch.cat([pooled, prompt], dim=-1)).squeeze(-1)

    def save(self, directory: str | Path, extra_config: dict | None = None) -> None:
        """``model.safetensors`` + ``config.json`` (the architecture, and ``extra_config`` for the record)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps({"architecture": self.config, **(extra_config or {})}, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "TinyCritic":
        directory = Path(directory).expanduser()
        missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"tiny_critic: {directory} lacks {missing}; train one with `r2d3ray train-critic --config "
                f"configs/tiny_critic.yaml --out DIR` (or leave checkpoint unset for the committed {TINY_CRITIC_DIR})"
            )
        architecture = json.loads((directory / CONFIG_NAME).read_text())["architecture"]
        critic = cls(widths=tuple(architecture["widths"]), embed_dim=architecture["embed_dim"],
                     image_size=architecture["image_size"])
        critic.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return critic


@register_reward("tiny_critic")
class TinyCriticReward(RewardModel):
    """The frozen :class:`TinyCritic`'s logit for each view against its object's prompt, (B, V).

    checkpoint: a directory written by ``r2d3ray train-critic`` (default: the committed
    ``r2d3ray/assets/tiny_critic``). Prompts must be in the tiny world's vocabulary.
    """

    name = "tiny_critic"

    def __init__(self, checkpoint: str | Path | None = None):
        super().__init__()
        self.critic = TinyCritic.load(TINY_CRITIC_DIR if checkpoint is None else checkpoint)
        self.critic.requires_grad_(False).eval()

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        try:
            words = prompt_indices(prompts).to(images.device)  # (B, 4)
        except ValueError as err:
            raise ValueError(f"tiny_critic: {err}") from None
        words = words.repeat_interleave(V, dim=0)  # (B·V, 4): every view shares its object's prompt
        return self.critic(images.flatten(0, 1), words).view(B, V)
