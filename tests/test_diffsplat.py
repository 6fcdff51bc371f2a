"""The DiffSplat adapter on a tiny random-weight checkpoint in the real directory layout."""
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

from r2d3ray.models import lora
from r2d3ray.models.diffsplat import (
    DiffSplatGenerator,
    PromptCache,
    convert_gsvae,
    write_prompt_cache_shard,
)
from r2d3ray.models.generator import CheckpointNotFoundError
from r2d3ray.models.mv_attention import Float32LayerNorm, MVAttnProcessor
from r2d3ray.models.schedulers import PIXART_SIGMA_SCHEDULER_CONFIG
# the real classes at toy sizes (latent 8x8 per view, x8 VAE -> 64x64 splatter images)
from r2d3ray.models.tiny_diffsplat import TINY_GSVAE_CONFIG, TINY_SDXL_VAE_CONFIG, TINY_TRANSFORMER_CONFIG
from r2d3ray.render.cameras import default_rig, plucker_rays

PROMPTS = ["", "a red car", "a wooden chair"]
MAX_LENGTH = 12


def _cache_tensors():
    lengths = torch.tensor([1, 4, 6])
    mask = (torch.arange(MAX_LENGTH) < lengths[:, None]).long()  # (3, L)
    embeds = torch.randn(3, MAX_LENGTH, 32, generator=torch.Generator().manual_seed(0)) * mask[..., None]
    return embeds, mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("diffsplat")
    # saved as diffusers' own PixArt class, as a checkpoint of another class name would be
    PixArtTransformer2DModel.from_config(TINY_TRANSFORMER_CONFIG).save_pretrained(root / "transformer")
    AutoencoderKL(**TINY_GSVAE_CONFIG).save_pretrained(root / "gsvae")
    DPMSolverMultistepScheduler.from_config({**PIXART_SIGMA_SCHEDULER_CONFIG, "solver_order": 2}).save_config(root / "scheduler")
    write_prompt_cache_shard(root / "prompt_cache", PROMPTS, *_cache_tensors(), encoder="toy-t5")
    return root


@pytest.fixture(scope="module")
def generator(checkpoint):
    return DiffSplatGenerator.from_pretrained(checkpoint).eval()


def test_loads_and_produces_splats(generator):
    assert generator.latent_shape == (4, 4, 8, 8)
    assert isinstance(generator.denoiser.transformer_blocks[0].attn1.processor, MVAttnProcessor)
    latents = torch.randn(2, *generator.latent_shape, generator=torch.Generator().manual_seed(1))
    embeds = generator.encode_prompts(["a red car", "a wooden chair"])
    with torch.no_grad():
        raw = generator.predict(latents, torch.tensor([999, 500]), embeds, guidance_scale=4.5)
        splatter = generator.latents_to_splatter(latents)
        splats = generator.latents_to_splats(latents)
    assert raw.shape == (2, 4, 8, 8, 8)  # ε + learned variance
    assert torch.equal(generator.eps_from_output(raw), raw[:, :, :4])
    assert splatter.shape == (2, 4, 12, 64, 64) and splatter.abs().max() <= 1.0
    assert splats.validate().num_gaussians == 4 * 64 * 64 and splats.batch_size == 2


def test_decode_is_the_gsvae_with_scaling(generator, checkpoint):
    latents = torch.randn(1, *generator.latent_shape, generator=torch.Generator().manual_seed(2))
    vae = AutoencoderKL.from_pretrained(checkpoint / "gsvae")
    with torch.no_grad():
        expected = vae.decode(latents[0] / 0.13025).sample.clamp(-1, 1)  # (V, 12, 64, 64), shift 0
        assert torch.equal(generator.latents_to_splatter(latents)[0], expected)


def test_plucker_rays_are_diffsplats(generator):
    rays = plucker_rays(default_rig(4), 64, 64, pixel_convention="diffsplat_plucker")
    assert torch.equal(generator.plucker, F.interpolate(rays, size=(8, 8), mode="bilinear", align_corners=False))


def test_prompt_cache_round_trip(generator, checkpoint):
    embeds, mask = _cache_tensors()
    looked_up = generator.encode_prompts(["a wooden chair", "a red car"])
    assert torch.equal(looked_up.embeds, embeds[[2, 1]]) and torch.equal(looked_up.mask, mask[[2, 1]])
    negative = generator.negative_embeds(3)
    assert negative.batch_size == 3 and torch.equal(negative.mask[0], mask[0])
    with pytest.raises(ValueError, match="a blue table"):
        generator.encode_prompts(["a red car", "a blue table"])
    cache = PromptCache(checkpoint / "prompt_cache")
    assert (cache.max_length, cache.embed_dim, cache.encoder) == (MAX_LENGTH, 32, "toy-t5")


def test_missing_negative_or_wrong_width_is_refused(checkpoint, tmp_path):
    embeds, mask = _cache_tensors()
    write_prompt_cache_shard(tmp_path / "no_negative", PROMPTS[1:], embeds[1:], mask[1:], encoder="toy-t5")
    transformer = DiffSplatGenerator.from_pretrained(checkpoint).denoiser
    vae = AutoencoderKL.from_pretrained(checkpoint / "gsvae")
    with pytest.raises(ValueError, match="empty prompt"):
        DiffSplatGenerator(transformer, vae, PromptCache(tmp_path / "no_negative"), {})
    write_prompt_cache_shard(tmp_path / "wide", PROMPTS, torch.zeros(3, 4, 64), torch.ones(3, 4), encoder="big")
    with pytest.raises(ValueError, match="caption_channels=32"):
        DiffSplatGenerator(transformer, vae, PromptCache(tmp_path / "wide"), {})
    with pytest.raises(ValueError, match="right-padded"):
        write_prompt_cache_shard(tmp_path / "bad", ["x"], torch.zeros(1, 3, 8), torch.tensor([[0, 1, 1]]), encoder="e")


@pytest.mark.parametrize(
    "missing",
    ["transformer/diffusion_pytorch_model.safetensors", "gsvae/config.json", "scheduler/scheduler_config.json", "prompt_cache"],
)
def test_missing_file_error_names_the_path(checkpoint, tmp_path, missing):
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint, root)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        DiffSplatGenerator.from_pretrained(root)
    assert isinstance(info.value, FileNotFoundError) and str(target) in str(info.value)


def test_bf16_uses_float32_softmax(checkpoint, generator):
    bf16 = DiffSplatGenerator.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).eval()
    assert bf16.denoiser.dtype == torch.bfloat16 and bf16.denoiser.transformer_blocks[0].attn1.processor.upcast_softmax
    assert all(isinstance(norm, Float32LayerNorm) for norm in [bf16.denoiser.norm_out] +
               [block.norm2 for block in bf16.denoiser.transformer_blocks])
    latents = torch.randn(1, *generator.latent_shape, generator=torch.Generator().manual_seed(4))
    embeds = generator.encode_prompts(["a red car"])
    with torch.no_grad():
        out, reference = bf16.predict(latents, 300, embeds), generator.predict(latents, 300, embeds)
    assert out.dtype == torch.float32  # the latents' dtype
    assert (out - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_save_pretrained_round_trip_and_lora(generator, tmp_path):
    generator.save_pretrained(tmp_path)
    loaded = DiffSplatGenerator.from_pretrained(tmp_path).eval()
    latents = torch.randn(1, *generator.latent_shape, generator=torch.Generator().manual_seed(5))
    embeds = generator.encode_prompts(["a red car"])
    with torch.no_grad():
        assert torch.equal(loaded.predict(latents, 10, embeds, 3.0), generator.predict(latents, 10, embeds, 3.0))
    lora.add_lora_adapter(loaded.denoiser, "policy")
    assert all("lora_" in n for n, p in loaded.named_parameters() if p.requires_grad)  # VAE frozen too
    with pytest.raises(ValueError, match="save_lora"):
        loaded.save_pretrained(tmp_path / "again")


def test_convert_gsvae_from_a_diffsplat_checkpoint(tmp_path):
    # DiffSplat's GSAutoencoderKL state: an SDXL-architecture VAE under "vae." (12-channel convs) + a tiny decoder
    sdxl_like_config = dict(TINY_SDXL_VAE_CONFIG)
    gsvae = AutoencoderKL.from_config({**sdxl_like_config, "in_channels": 12, "out_channels": 12})
    state = {f"vae.{k}": v for k, v in gsvae.state_dict().items()}
    state["tiny_decoder.layers.0.weight"] = torch.zeros(3)
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))

    converted = convert_gsvae(tmp_path / "model.safetensors", sdxl_like_config, tmp_path / "gsvae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "gsvae")
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, gsvae.eval().decode(z).sample)
    assert converted.config.in_channels == 12
    with pytest.raises(ValueError, match="no 'vae.' weights"):
        safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        convert_gsvae(tmp_path / "other.safetensors", sdxl_like_config, tmp_path / "out")


def _lora_loss_and_grads(generator, latents, embeds):
    """A loss through the policy at x_t and the input gradient at x_{t-1} (Nabla's two backward
    passes), and the LoRA gradients it leaves."""
    x_prev = latents.clone().requires_grad_(True)
    (input_grad,) = torch.autograd.grad(generator.predict(x_prev, 600, embeds, 4.5).square().sum(), x_prev)
    loss = generator.predict(latents, 700, embeds, 4.5).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in generator.denoiser.named_parameters() if p.requires_grad}
    return loss.detach(), input_grad, grads


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(checkpoint, monkeypatch):
    from r2d3ray.config import build_config
    from r2d3ray.models.loading import load_generator

    calls = []
    checkpoint_fn = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint_fn(*a, **k))
    latents = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    results = []
    for enabled in (False, True):
        cfg = build_config({"model": {"kind": "diffsplat", "path": str(checkpoint), "gradient_checkpointing": enabled,
                                      "device": "cpu"}})
        generator = load_generator(cfg)
        assert generator.denoiser.gradient_checkpointing is enabled
        lora.add_lora_adapter(generator.denoiser, "policy", rank=4)
        with torch.no_grad():  # B = 0 at init: give the adapter weights so every LoRA gradient is non-zero
            for param in lora.adapter_parameters(generator.denoiser, "policy").values():
                param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
        results.append(_lora_loss_and_grads(generator, latents, generator.encode_prompts(["a red car", "a wooden chair"])))
    (loss, input_grad, grads), (loss_ckpt, input_grad_ckpt, grads_ckpt) = results
    assert calls  # the blocks did run under torch.utils.checkpoint
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(input_grad_ckpt, input_grad)
    assert grads.keys() == grads_ckpt.keys() and all("lora_" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name])
