"""The learned rewards (HPSv2, LAION aesthetic, YOSO normal estimator).

Tiny random-weight models of the real classes (open_clip CLIP, diffusers AutoencoderKL /
UNet2DConditionModel / ControlNetModel) are saved in the real checkpoint layouts and loaded through
the rewards' own loaders; the LAION head is the real vendored file. Nothing is downloaded.
"""

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from PIL import Image

from r2d3ray.rewards import build_reward
from r2d3ray.rewards.aesthetic import LAION_HEAD, AestheticReward
from r2d3ray.rewards.clip_utils import clip_preprocess
from r2d3ray.rewards.hps import HPSv2Reward
from r2d3ray.rewards.normal import LatentControlNet, NormalEstimatorReward

MEAN, STD = open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD
# ViT-H-14 / ViT-L-14 shaped but small: 28-px input (2x2 patches of 14), one layer per tower.
# The HPS text tower keeps the real vocabulary so the real tokenizer's ids fit.
TINY_HPS = dict(
    embed_dim=32,
    vision_cfg={"image_size": 28, "layers": 1, "width": 64, "patch_size": 14, "head_width": 32},
    text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
)
# OpenAI checkpoints carry no config: open_clip infers it (64-wide heads), so widths are 64.
TINY_VIT_L = dict(
    embed_dim=768,
    vision_cfg={"image_size": 28, "layers": 1, "width": 64, "patch_size": 14},
    text_cfg={"context_length": 77, "vocab_size": 100, "width": 64, "heads": 1, "layers": 1},
)
PROMPTS = ["a red wooden chair", "a small blue teapot"]



def images_like(B=2, V=2, size=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (0.25 + 0.5 * torch.rand(B, V, 3, size, size, generator=g)).to(dtype)  # away from 0 and 1


def reference_pixels(images, size):
    """The official val transform on tensors, via torchvision: bicubic antialiased resize + CLIP mean/std."""
    x = TF.resize(images.flatten(0, 1), [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(x, MEAN, STD)


def check_directional_derivatives(score, x, grad, n_directions=2, eps=1e-4):
    """<grad, d> against the central difference of ``score`` (a scalar function of x) along random d."""
    g = torch.Generator().manual_seed(1)
    for _ in range(n_directions):
        d = torch.randn(x.shape, generator=g, dtype=x.dtype)
        fd = (score(x + eps * d) - score(x - eps * d)) / (2 * eps)
        analytic = (grad * d).sum()
        assert analytic.abs() > 1e-8, "degenerate check: the gradient is orthogonal to the direction"
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- HPSv2


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """(directory, fp16 state dict): a tiny HPS checkpoint saved as the real one is, fp16 under
    "state_dict", with the v2.1 file name."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_HPS)
    state = {k: v.half() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": state}, root / "HPS_v2.1_compressed.pt")
    return root, state


def test_hps_scores_match_the_directly_built_model(hps_checkpoint):
    root, state = hps_checkpoint
    reward = HPSv2Reward(root, version="v2.1", arch_overrides=TINY_HPS)
    images = images_like()
    values = reward.score(images, PROMPTS).values  # (2, 2)

    model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_HPS).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        image_features, text_features, _ = model(reference_pixels(images, 28), open_clip.tokenize(PROMPTS))
    expected = torch.einsum("bvd,bd->bv", image_features.view(2, 2, -1), text_features)
    assert values.shape == (2, 2) and values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    assert (values[0] - values[1]).abs().max() > 1e-4  # the prompt matters


def test_hps_loads_a_bare_state_dict_with_module_prefix(hps_checkpoint, tmp_path):
    root, state = hps_checkpoint
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    images = images_like(B=1)
    a = HPSv2Reward(path, arch_overrides=TINY_HPS).score(images, PROMPTS[:1]).values
    b = HPSv2Reward(root, arch_overrides=TINY_HPS).score(images, PROMPTS[:1]).values
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hps_gradient_matches_finite_differences(hps_checkpoint):
    reward = build_reward("hps", checkpoint=hps_checkpoint[0], arch_overrides=TINY_HPS).double()
    x = images_like(B=1, size=20, dtype=torch.float64)
    out = reward.score(x, PROMPTS[:1], with_grad=True)
    assert out.grads.shape == x.shape and out.grads.abs().sum() > 0
    check_directional_derivatives(lambda y: reward.score(y, PROMPTS[:1]).values.sum(), x, out.grads)


def test_clip_preprocess_matches_the_official_pil_transform():
    # A smooth 256-px render; PIL works on uint8, so agreement is to within rounding (~1/255).
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=256, mode="bilinear")[0]
    as_uint8 = (image * 255).round().to(torch.uint8)
    official = open_clip.image_transform(224, is_train=False)(Image.fromarray(as_uint8.permute(1, 2, 0).numpy()))
    ours = clip_preprocess(as_uint8[None].float() / 255, (224, 224))[0]
    assert ours.shape == official.shape == (3, 224, 224)
    assert (ours - official).abs().max() < 2.5 / 255 / min(STD)


def test_hps_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt.*xswu/HPSv2") as info:
        HPSv2Reward(tmp_path, version="v2.0")
    assert str(tmp_path / "HPS_v2_compressed.pt") in str(info.value)
    with pytest.raises(ValueError, match="version='v3'"):
        HPSv2Reward(tmp_path, version="v3")


# ---------------------------------------------------------------- LAION aesthetic


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """(path, fp16 state dict): a tiny OpenAI-format CLIP (fp16 tensors, OpenAI key layout)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, **TINY_VIT_L)
    state = {k: v.half() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("clip") / "ViT-L-14.pt"
    torch.save(state, path)
    return path, state


def laion_affine_map():
    """The head composed into one affine map (A (1, 768), c (1,)), straight from the vendored file."""
    state = {k: v.double() for k, v in torch.load(LAION_HEAD, map_location="cpu", weights_only=True).items()}
    A, c = state["layers.0.weight"], state["layers.0.bias"]
    for i in (2, 4, 6, 7):
        A, c = state[f"layers.{i}.weight"] @ A, state[f"layers.{i}.weight"] @ c + state[f"layers.{i}.bias"]
    return A, c


def test_real_laion_head_is_one_affine_map_with_plausible_scores(clip_checkpoint):
    head = AestheticReward(clip_checkpoint[0]).head.double()
    A, c = laion_affine_map()
    x = torch.randn(64, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(head(x), x @ A.T + c)
    head.train()  # dropout slots are Identity: training mode changes nothing
    torch.testing.assert_close(head(x), x @ A.T + c)
    scores = head(torch.nn.functional.normalize(x, dim=-1))  # random unit CLIP embeddings
    assert 1.0 < scores.min() and scores.max() < 10.0


def test_aesthetic_scores_match_the_directly_built_model(clip_checkpoint):
    path, state = clip_checkpoint
    reward = build_reward("aesthetic", clip_checkpoint=str(path))
    images = images_like()
    values = reward.score(images, PROMPTS).values

    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, **TINY_VIT_L).eval()
    model.load_state_dict(state)
    A, c = laion_affine_map()
    with torch.no_grad():
        embeddings = model.encode_image(reference_pixels(images, 28), normalize=True).double()
    expected = (embeddings @ A.T + c).view(2, 2).float()
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-4)
    assert values.std() > 0


def test_aesthetic_gradient_matches_finite_differences(clip_checkpoint):
    reward = AestheticReward(clip_checkpoint[0]).double()
    x = images_like(B=1, size=20, dtype=torch.float64)
    out = reward.score(x, PROMPTS[:1], with_grad=True)
    check_directional_derivatives(lambda y: reward.score(y, PROMPTS[:1]).values.sum(), x, out.grads)


def test_aesthetic_errors(tmp_path):
    missing = tmp_path / "ViT-L-14.pt"
    with pytest.raises(FileNotFoundError, match="timm/vit_large_patch14_clip_224.openai") as info:
        AestheticReward(missing)
    assert str(missing) in str(info.value)
    small = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, **{**TINY_VIT_L, "embed_dim": 32})
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="32-d image embeddings"):
        AestheticReward(tmp_path / "small.pt")


# ---------------------------------------------------------------- YOSO normal estimator


@pytest.fixture(scope="module")
def yoso_dir(tmp_path_factory):
    """A tiny estimator in the diffusers layout vae/ unet/ controlnet/; unet and controlnet as fp16
    variant files (as the Hugging Face repos ship them), the vae without a variant."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    controlnet = ControlNetModel.from_unet(unet)
    # Identity "zero-convolutions": then diffusers' own ControlNet forward with a zero conditioning
    # embedding (its conv_out is zero-initialised) computes what LatentControlNet should.
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
            conv.bias.zero_()
    root = tmp_path_factory.mktemp("yoso")
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet", variant="fp16")
    controlnet.save_pretrained(root / "controlnet", variant="fp16")
    return root


def test_latent_controlnet_is_controlnet_without_cond_embedding_and_zero_convs(yoso_dir):
    reward = NormalEstimatorReward(yoso_dir)
    controlnet = reward.controlnet
    assert isinstance(controlnet, LatentControlNet)
    g = torch.Generator().manual_seed(0)
    latent, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([0, 0])
    down, mid = controlnet(latent, t, context)
    ref_down, ref_mid = ControlNetModel.forward(
        controlnet, latent, t, context, controlnet_cond=torch.rand(2, 3, 64, 64, generator=g), return_dict=False
    )
    assert len(down) == len(ref_down) == len(controlnet.controlnet_down_blocks)
    for a, b in zip([*down, mid], [*ref_down, ref_mid]):
        torch.testing.assert_close(a, b)


def test_normal_reward_is_one_on_the_estimate_and_minus_one_on_its_opposite(yoso_dir):
    reward = build_reward("normal", weights_dir=str(yoso_dir))
    images = images_like(B=1, V=2, size=16)
    estimate = reward.estimate(images.flatten(0, 1)).view(1, 2, 3, 16, 16)
    assert torch.allclose(estimate.norm(dim=2), torch.ones(1, 2, 16, 16), atol=1e-5)
    opencv = estimate * torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)  # the default frame conversion
    alphas = torch.ones(1, 2, 1, 16, 16)
    values = reward.score(images, PROMPTS[:1], {"alphas": alphas, "normals": opencv}).values
    torch.testing.assert_close(values, torch.ones(1, 2))
    values = reward.score(images, PROMPTS[:1], {"alphas": alphas, "normals": -opencv}).values
    torch.testing.assert_close(values, -torch.ones(1, 2))
    # Pixels at or under the alpha threshold are not scored.
    half = torch.cat([torch.ones(1, 2, 1, 16, 8), torch.zeros(1, 2, 1, 16, 8)], dim=-1)
    mixed = torch.cat([opencv[..., :8], -opencv[..., 8:]], dim=-1)
    values = reward.score(images, PROMPTS[:1], {"alphas": half, "normals": mixed}).values
    torch.testing.assert_close(values, torch.ones(1, 2))
    # max_angle_deg drops the pixels where render and estimate disagree (here the flipped half).
    values = reward.score(images, PROMPTS[:1], {"alphas": alphas, "normals": mixed}).values
    torch.testing.assert_close(values, torch.zeros(1, 2), atol=1e-6, rtol=0)
    reward.max_angle_deg = 90.0
    values = reward.score(images, PROMPTS[:1], {"alphas": alphas, "normals": mixed}).values
    torch.testing.assert_close(values, torch.ones(1, 2))


def test_normal_gradient_reaches_only_the_rendered_normals(yoso_dir):
    reward = NormalEstimatorReward(yoso_dir)
    g = torch.Generator().manual_seed(2)
    images = images_like(B=1, V=1, size=16, dtype=torch.float64)
    extras = {
        "alphas": torch.rand(1, 1, 1, 16, 16, generator=g, dtype=torch.float64),
        "normals": torch.nn.functional.normalize(torch.randn(1, 1, 3, 16, 16, generator=g, dtype=torch.float64), dim=2),
    }
    out = reward.score(images, PROMPTS[:1], extras, with_grad=True)
    assert set(out.extra_grads) == {"normals"}
    assert torch.count_nonzero(out.grads) == 0  # the estimate is a stop-gradient target
    assert out.extra_grads["normals"].abs().sum() > 0

    def score(normals):
        return reward.score(images, PROMPTS[:1], {**extras, "normals": normals}).values.sum()

    check_directional_derivatives(score, extras["normals"], out.extra_grads["normals"])
    # Rendered normals are zero where undefined (depth_to_normals' border): no score, no NaN.
    zeroed = extras["normals"].clone()
    zeroed[..., 0, :] = 0
    out = reward.score(images, PROMPTS[:1], {**extras, "normals": zeroed}, with_grad=True)
    assert out.finite.all() and torch.count_nonzero(out.extra_grads["normals"][..., 0, :]) == 0


def test_normal_errors(yoso_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="Stable-X/yoso-normal-v1-7") as info:
        NormalEstimatorReward(tmp_path)
    assert str(tmp_path / "vae" / "config.json") in str(info.value)
    with pytest.raises(ValueError, match="estimator_to_opencv"):
        NormalEstimatorReward(yoso_dir, estimator_to_opencv=(1, 0.5, -1))
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        NormalEstimatorReward(yoso_dir, processing_resolution=15)
    with pytest.raises(ValueError, match="extras is missing"):
        NormalEstimatorReward(yoso_dir).score(images_like(B=1), PROMPTS[:1], {"alphas": torch.ones(1, 2, 1, 32, 32)})
