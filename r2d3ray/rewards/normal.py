"""Normal consistency against a monocular normal estimator (StableNormal's one-step YOSO stage).

As Nabla-R2D3's ``normal_yoso`` (its `rewards_normal.py`): an estimator predicts normals from
each rendered RGB view; the reward is the masked mean cosine between the rendered normals and that
prediction over pixels with alpha > 0.5, in [-1, 1]. The prediction is a stop-gradient target (the
reference's ``reward_context=inference``), so the gradient reaches the rendered normals only.

The estimator follows ``YOSONormalsPipeline`` of StableNormal v1.5+ (``nirne/pipeline_yoso_normal.py``),
built from diffusers components: VAE-encode the image (in [-1, 1]) to its latent z; a ControlNet
encoder runs on z at the fixed timestep ``t_start``; one UNet forward of z plus the ControlNet
residuals gives the normal latent; VAE-decode; L2-normalise per pixel. The text condition is a zero
tensor (1, 257, 1024), as in that pipeline, so no text encoder is needed.

Weights: a local directory in the diffusers layout,

    weights_dir/vae/        config.json + diffusion_pytorch_model[.fp16].safetensors  (AutoencoderKL)
    weights_dir/unet/       config.json + diffusion_pytorch_model[.fp16].safetensors  (UNet2DConditionModel)
    weights_dir/controlnet/ config.json + diffusion_pytorch_model[.fp16].safetensors  (ControlNetModel weights)

which is how the Hugging Face repos Stable-X/yoso-normal-v1-* are laid out as far as we know (the
reference loads v1-7 with ``from_pretrained(..., variant="fp16")``; Hi3DGen's loader of v1-8-1 reads
these three folders plus model_index.json). A snapshot of the repo can be passed as it is; files
without the non-variant name are loaded as the fp16 variant. Not verified (no download possible
here): the exact file list of v1-7, and that its ``controlnet/controlnetvae.py`` is the
ControlNetVAEModel seen in Hi3DGen (mirrored by ``LatentControlNet`` below).

Normal frame: the rendered normals are camera-space OpenCV (x right, y down, z forward, facing the
camera). The estimator's frame is presumably Marigold's (x right, y up, z towards the viewer),
hence the default ``estimator_to_opencv=(1, -1, -1)``. This is unverified: check it on the GPU
machine with real weights (render a sphere, run the estimator, fit the per-axis signs).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from r2d3ray.render.normals import depth_normal_consistency
from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.registry import register_reward

# Token count of the zero text condition in StableNormal's pipeline (zeros(1, 257, 1024)).
EMPTY_CONTEXT_TOKENS = 257
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LatentControlNet(ControlNetModel):
    """ControlNetModel's weights with StableNormal's ControlNetVAEModel forward.

    The image latent is the ControlNet's own input (through ``conv_in``); there is no separate
    conditioning image, so ``controlnet_cond_embedding`` is unused, and the down/mid features are
    returned as they are, without the zero-convolutions. diffusers has no such mode, hence this
    forward; like SD2's, the config must have no class or addition embeddings.
    """

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        """latent (N, C, h, w), timestep (N,) -> (down residuals, list of (N, c_i, h_i, w_i); mid residual)."""
        emb = self.time_embedding(self.time_proj(timestep).to(latent.dtype))  # (N, D_t)
        context = {"encoder_hidden_states": encoder_hidden_states}
        h = self.conv_in(latent)
        residuals = [h]
        for block in self.down_blocks:
            h, block_residuals = block(h, emb, **(context if getattr(block, "has_cross_attention", False) else {}))
            residuals.extend(block_residuals)
        h = self.mid_block(h, emb, **(context if getattr(self.mid_block, "has_cross_attention", False) else {}))
        return residuals, h


@register_reward("normal")
class NormalEstimatorReward(RewardModel):
    """Masked mean cosine between rendered normals and a YOSO estimate from the RGB view, (B, V).

    Needs extras ``alphas`` and ``normals`` (camera-space OpenCV); the gradient is w.r.t. the
    normals (``extra_grads["normals"]``), the image gradient is zero. Prompts are ignored.

    weights_dir: the diffusers-layout directory above; t_start: the estimator's fixed timestep
    (0, as StableNormal v1.5+ and StableNormal_turbo); estimator_to_opencv: per-axis signs taking
    the estimator's normals to OpenCV camera space (unverified default, see the module docstring);
    alpha_threshold: pixels with alpha above it are scored; max_angle_deg: if set, also drop pixels
    where render and estimate disagree by more than this angle (estimator outliers);
    processing_resolution: resize views to this square size for the estimator (None: as rendered,
    as the reference does with 256-px renders); dtype: of the UNet and ControlNet ("float16" on GPU
    as the reference; the VAE stays float32).
    """

    name = "normal"
    needs = frozenset({"alphas", "normals"})
    grad_extras = frozenset({"normals"})

    def __init__(
        self,
        weights_dir: str | Path,
        t_start: int = 0,
        estimator_to_opencv: tuple[float, float, float] = (1.0, -1.0, -1.0),
        alpha_threshold: float = 0.5,
        max_angle_deg: float | None = None,
        processing_resolution: int | None = None,
        dtype: str = "float32",
    ):
        super().__init__()
        if len(estimator_to_opencv) != 3 or any(s not in (1, -1) for s in estimator_to_opencv):
            raise ValueError(
                f"normal: estimator_to_opencv={estimator_to_opencv!r}; expected three signs, each 1 or -1"
            )
        if max_angle_deg is not None and not 0 < max_angle_deg <= 180:
            raise ValueError(f"normal: max_angle_deg={max_angle_deg!r}; expected None or a float in (0, 180]")
        if dtype not in DTYPES:
            raise ValueError(f"normal: dtype={dtype!r}; expected one of {sorted(DTYPES)}")
        root = Path(weights_dir).expanduser()
        models = {}
        for sub, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel), ("controlnet", LatentControlNet)):
            folder = root / sub
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"normal: estimator weights not found: {folder / 'config.json'}. weights_dir must be a "
                    "diffusers-layout directory with vae/, unet/ and controlnet/, e.g. a snapshot of the Hugging "
                    "Face repo Stable-X/yoso-normal-v1-7 (`huggingface-cli download Stable-X/yoso-normal-v1-7 "
                    "--local-dir DIR`, then weights_dir=DIR)."
                )
            has_full = any((folder / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "bin"))
            torch_dtype = torch.float32 if sub == "vae" else DTYPES[dtype]
            models[sub] = cls.from_pretrained(folder, variant=None if has_full else "fp16", torch_dtype=torch_dtype)
        self.vae, self.unet, self.controlnet = models["vae"], models["unet"], models["controlnet"]
        if self.controlnet.class_embedding is not None or self.controlnet.config.addition_embed_type is not None:
            raise ValueError(f"normal: {root / 'controlnet'} uses class/addition embeddings, which YOSO does not")
        downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if processing_resolution is not None and processing_resolution % downsampling:
            raise ValueError(
                f"normal: processing_resolution={processing_resolution}; expected a multiple of the VAE's "
                f"downsampling factor {downsampling}"
            )
        self.requires_grad_(False).eval()
        self.t_start = int(t_start)
        self.estimator_to_opencv = tuple(float(s) for s in estimator_to_opencv)
        self.alpha_threshold = alpha_threshold
        self.max_angle_deg = max_angle_deg
        self.processing_resolution = processing_resolution

    @torch.no_grad()
    def estimate(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> unit normals (N, 3, H, W) in the estimator's frame."""
        N, _, H, W = images.shape
        x = images.to(self.vae.dtype) * 2 - 1
        if self.processing_resolution is not None:
            size = (self.processing_resolution,) * 2
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        latent = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor  # (N, 4, h, w)
        latent = latent.to(self.unet.dtype)
        t = torch.full((N,), self.t_start, dtype=torch.long, device=latent.device)
        context = latent.new_zeros(N, EMPTY_CONTEXT_TOKENS, self.unet.config.cross_attention_dim)
        down, mid = self.controlnet(latent, t, context)
        normal_latent = self.unet(
            latent, t, encoder_hidden_states=context,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample  # (N, 4, h, w)
        decoded = self.vae.decode(normal_latent.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        normals = F.normalize(decoded, dim=1, eps=1e-6)  # (N, 3, h*8, w*8)
        if normals.shape[-2:] != (H, W):
            normals = F.interpolate(normals, size=(H, W), mode="bilinear", align_corners=False)
            normals = F.normalize(normals, dim=1, eps=1e-6)
        return normals.to(images.dtype)

    def forward(self, images, prompts, extras):
        B, V, _, H, W = images.shape
        estimate = self.estimate(images.flatten(0, 1)).view(B, V, 3, H, W)
        target = estimate * estimate.new_tensor(self.estimator_to_opencv).view(3, 1, 1)  # OpenCV camera space
        rendered, alphas = extras["normals"], extras["alphas"]  # (B, V, 3, H, W), (B, V, 1, H, W)
        if self.max_angle_deg is not None:
            agree = F.cosine_similarity(rendered.detach(), target, dim=2)[:, :, None]  # (B, V, 1, H, W)
            alphas = alphas * (agree >= math.cos(math.radians(self.max_angle_deg)))
        return depth_normal_consistency(rendered, target, alphas, threshold=self.alpha_threshold)
