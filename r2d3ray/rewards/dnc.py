"""DNC, depth-normal consistency: a geometry reward computed from the render alone, no weights.

As Nabla-R2D3's ``normal_d2n_cons`` (its `rewards_normal.py`): normals are derived from the
expected depth by back-projection and finite differences, compared with the rendered per-Gaussian
normals, and the reward is their masked mean cosine over pixels with alpha > 0.5, in [-1, 1].
Consistent (flat, well-oriented Gaussians sitting on the surface they draw) scores near 1.

``reward_context``:
- ``"train"``: gradients flow through both normal fields (depths and rendered normals).
- ``"inference"``: the depth-derived normal is a fixed target (stop-gradient through depth), i.e.
  the reference's ``||normal - sg(f(D(z)))||²`` reading; the depth gradient is zero.
"""

from __future__ import annotations

import math

import torch

from r2d3ray.render.cameras import DIFFSPLAT_FXFY, orbit_cameras, pixel_rays
from r2d3ray.render.normals import depth_normal_consistency, depth_to_normals
from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.registry import register_reward

REWARD_CONTEXTS = ("train", "inference")


@register_reward("dnc")
class DepthNormalConsistencyReward(RewardModel):
    """Masked mean cosine between depth-derived and rendered normals, per view.

    Needs extras ``alphas``, ``depths`` (expected depth) and ``normals`` (camera-space OpenCV,
    facing the camera, as rendered from ``gaussian_normals``); returns gradients w.r.t. depths and
    normals in ``extra_grads`` (the image gradient is zero: DNC does not look at colours).

    fxfy: the renders' normalised focal length (``fx = fxfy · W``), needed to back-project depth;
    alpha_threshold: pixels with alpha above it are scored;
    max_angle_deg: if set, also drop pixels whose depth normal is more than this many degrees from
    facing the camera (grazing surfaces, where finite differences of depth are least reliable).
    """

    name = "dnc"
    needs = frozenset({"alphas", "depths", "normals"})
    grad_extras = frozenset({"depths", "normals"})

    def __init__(
        self,
        reward_context: str = "train",
        fxfy: float = DIFFSPLAT_FXFY,
        alpha_threshold: float = 0.5,
        max_angle_deg: float | None = None,
    ):
        super().__init__()
        if reward_context not in REWARD_CONTEXTS:
            raise ValueError(f"dnc: reward_context={reward_context!r}; expected one of {REWARD_CONTEXTS}")
        if not fxfy > 0:
            raise ValueError(f"dnc: fxfy={fxfy!r}; expected a float > 0")
        if max_angle_deg is not None and not 0 < max_angle_deg <= 90:
            raise ValueError(f"dnc: max_angle_deg={max_angle_deg!r}; expected None or a float in (0, 90]")
        self.reward_context = reward_context
        self.fxfy = fxfy
        self.alpha_threshold = alpha_threshold
        self.max_angle_deg = max_angle_deg

    def forward(self, images, prompts, extras):
        B, V, _, H, W = images.shape
        # Camera-space normals from depth depend only on the intrinsics, so any pose will do.
        zeros = [0.0] * V
        cameras = orbit_cameras(zeros, zeros, fxfy=self.fxfy, width=W, height=H).to(images.device)
        depth_normals = depth_to_normals(extras["depths"], cameras)  # (B, V, 3, H, W)
        if self.reward_context == "inference":
            depth_normals = depth_normals.detach()
        alphas = extras["alphas"]  # (B, V, 1, H, W)
        if self.max_angle_deg is not None:
            # Cosine between each depth normal and the direction from its pixel to the camera.
            _, dirs = pixel_rays(cameras)  # (V, H, W, 3) world space, unit
            dirs = torch.einsum("vij,vhwj->vihw", cameras.viewmats[:, :3, :3], dirs)  # (V, 3, H, W) camera space
            cos = -(depth_normals.detach() * dirs.to(depth_normals.dtype)).sum(2, keepdim=True)  # (B, V, 1, H, W)
            alphas = alphas * (cos >= math.cos(math.radians(self.max_angle_deg)))
        return depth_normal_consistency(extras["normals"], depth_normals, alphas, threshold=self.alpha_threshold)
