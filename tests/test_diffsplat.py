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
    cache_prompts,
    convert_gsvae,
    write_prompt_cache_shard,
)
from r2d3ray.models.generator import CheckpointNotFoundError
from r2d3ray.models.mv_attention import MVAttnProcessor
from r2d3ray.models.schedulers import PIXART_SIGMA_SCHEDULER_CONFIG
from r2d3ray.render.cameras import default_rig, plucker_rays

# reference/models.md §6.2: the real classes at toy sizes (latent 8x8 per view, x8 VAE -> 64x64 splatter images)
TRANSFORMER_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=10, out_channels=8, num_layers=2, cross_attention_dim=16,
    sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single", use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
VAE_CONFIG = dict(
    in_channels=12, out_channels=12, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    norm_num_groups=4, scaling_factor=0.13025,
)  # fmt: skip
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
    PixArtTransformer2DModel.from_config(TRANSFORMER_CONFIG).save_pretrained(root / "transformer")
    AutoencoderKL(**VAE_CONFIG).save_pretrained(root / "gsvae")
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


def test_cache_prompts_with_a_local_t5(checkpoint, tmp_path):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # A tiny T5 in the PixArt pipeline layout; the Unigram tokenizer is built offline from a word list.
    words = ["a", "red", "car", "wooden", "chair", "small"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in words]
    t5_dir = tmp_path / "t5"
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(t5_dir / "tokenizer")
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    encoder.save_pretrained(t5_dir / "text_encoder")

    shard = cache_prompts(t5_dir, ["A red  car", "a small wooden chair"], tmp_path / "cache", max_length=MAX_LENGTH,
                          torch_dtype=torch.float32)  # fmt: skip
    cache = PromptCache(shard.parent)
    assert set(cache.index) == {"", "A red  car", "a small wooden chair"} and cache.encoder == "t5"
    looked_up = cache.lookup(["A red  car", ""])
    ids = torch.tensor([[4, 5, 6, 1]])  # ▁a ▁red ▁car </s>: lower-cased, whitespace normalised
    with torch.no_grad():
        direct = encoder.eval()(ids, attention_mask=torch.ones_like(ids))[0][0]  # (4, 32)
    assert looked_up.mask.tolist() == [[1] * 4 + [0] * 8, [1] + [0] * 11]
    torch.testing.assert_close(looked_up.embeds[0, :4], direct)
    assert looked_up.embeds[0, 4:].abs().sum() == 0

    # the generator runs on the new cache
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint, root, ignore=shutil.ignore_patterns("prompt_cache"))
    shutil.copytree(shard.parent, root / "prompt_cache")
    generator = DiffSplatGenerator.from_pretrained(root).eval()
    latents = torch.randn(1, *generator.latent_shape)
    with torch.no_grad():
        assert torch.isfinite(generator.predict(latents, 999, generator.encode_prompts(["A red  car"]), 4.5)).all()


def test_convert_gsvae_from_a_diffsplat_checkpoint(tmp_path):
    # DiffSplat's GSAutoencoderKL state: an SDXL-architecture VAE under "vae." (12-channel convs) + a tiny decoder
    sdxl_like_config = {**VAE_CONFIG, "in_channels": 3, "out_channels": 3}
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
