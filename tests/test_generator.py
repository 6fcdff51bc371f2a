"""The generator interface on the tiny prior: shapes, CFG, prompts, save/load, multi-view attention."""
import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from r2d3ray.models.generator import CheckpointNotFoundError, PromptEmbeds, SplatGenerator
from r2d3ray.models.mv_attention import set_mv_attention
from r2d3ray.models.schedulers import SDEDPMSolver, predict_x0
from r2d3ray.models.tiny import TINY_DEFAULT_CONFIG, TINY_SCHEDULER_CONFIG, PromptTokenEncoder, TinySplatGenerator
from r2d3ray.models.world import vocabulary
from r2d3ray.render.cameras import default_rig, plucker_rays

SMALL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, resolution=16, caption_channels=32)
PROMPTS = ["a small red cube", "a tall blue cylinder"]


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return TinySplatGenerator.from_config(SMALL).eval()


def _latents(generator, batch_size=2, seed=1):
    return torch.randn(batch_size, *generator.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_splats(generator):
    V, C, h, w = generator.latent_shape
    assert (V, C, h, w) == (4, 12, 16, 16)
    latents = _latents(generator)
    with torch.no_grad():
        raw = generator.predict(latents, torch.tensor([999, 20]), generator.encode_prompts(PROMPTS))
    assert raw.shape == latents.shape and torch.isfinite(raw).all()
    assert torch.equal(generator.eps_from_output(raw), raw)  # no learned sigma

    splatter = generator.latents_to_splatter(3 * latents)
    assert splatter.shape == latents.shape and splatter.abs().max() <= 1.0
    splats = generator.latents_to_splats(latents).validate()
    assert (splats.batch_size, splats.num_gaussians) == (2, V * h * w)
    # Plücker conditioning of the default rig at the latent resolution
    assert torch.equal(generator.plucker, plucker_rays(default_rig(4), 16, 16))


def test_cfg_is_the_combination_of_cond_and_uncond(generator):
    latents, t = _latents(generator), torch.tensor([500, 30])
    embeds = generator.encode_prompts(PROMPTS)
    with torch.no_grad():
        guided = generator.predict(latents, t, embeds, guidance_scale=4.5)
        cond = generator.predict(latents, t, embeds)
        uncond = generator.predict(latents, t, generator.negative_embeds(2))
        other = generator.predict(latents, t, embeds, guidance_scale=4.5, negative=generator.encode_prompts(PROMPTS[::-1]))
    torch.testing.assert_close(guided, uncond + 4.5 * (cond - uncond), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(guided, cond, atol=1e-3)
    assert not torch.allclose(other, guided, atol=1e-3)  # an explicit negative is used


def test_predict_rejects_bad_input(generator):
    embeds = generator.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="latents"):
        generator.predict(torch.zeros(2, 4, 12, 8, 8), 10, embeds)
    with pytest.raises(ValueError, match="batch size"):
        generator.predict(_latents(generator, 3), 10, embeds)
    with pytest.raises(ValueError, match="t: expected"):
        generator.predict(_latents(generator), torch.tensor([1, 2, 3]), embeds)


def test_prompt_outside_the_vocabulary_is_refused(generator):
    with pytest.raises(ValueError) as info:
        generator.encode_prompts(["a red dragon"])
    message = str(info.value)
    assert "dragon" in message and all(word in message for word in vocabulary()["shape"])
    # a word of today's world that a saved model never saw
    encoder = PromptTokenEncoder(vocab=["red", "cube"], caption_channels=8)
    with pytest.raises(ValueError, match="training vocabulary.*'cube', 'red'"):
        encoder(["a blue cube"])
    with pytest.raises(ValueError, match="list of str"):
        encoder("a red cube")


def test_prompt_tokens_are_canonical(generator):
    a, b, empty = (generator.encode_prompts([p]) for p in ("a small red cube", "The RED small cube.", ""))
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.mask, b.mask)
    assert a.mask.tolist() == [[True, True, False, True, True]]  # start, size, (no attribute), colour, shape
    assert empty.mask.tolist() == [[True, False, False, False, False]]
    assert torch.equal(empty.embeds, generator.negative_embeds(1).embeds)
    assert empty.embeds[0, 1:].abs().sum() == 0  # masked slots are zero


def test_tiny_transformer_predicts_x0_and_the_generator_reports_its_eps(generator):
    latents, t = _latents(generator), torch.tensor([900, 3])
    embeds = generator.encode_prompts(PROMPTS)
    with torch.no_grad():
        eps = generator.predict(latents, t, embeds)
        x0 = SplatGenerator._denoise(generator, latents, t, embeds)  # the transformer's own output
    # x̂0 recovered from the reported ε (the samplers' formula) is the transformer's x̂0
    torch.testing.assert_close(predict_x0(eps, latents, t, generator.alphas_cumprod), x0, rtol=1e-4, atol=1e-4)


def test_save_and_load_round_trip(generator, tmp_path):
    generator.save_pretrained(tmp_path)
    for path in ["generator_config.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "prompt_encoder/config.json", "prompt_encoder/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"]:  # fmt: skip
        assert (tmp_path / path).is_file(), path
    assert json.loads((tmp_path / "generator_config.json").read_text())["num_views"] == 4
    loaded = TinySplatGenerator.from_pretrained(tmp_path).eval()
    latents, t = _latents(generator), torch.tensor([700, 1])
    with torch.no_grad():
        expected = generator.predict(latents, t, generator.encode_prompts(PROMPTS), guidance_scale=2.0)
        actual = loaded.predict(latents, t, loaded.encode_prompts(PROMPTS), guidance_scale=2.0)
    assert torch.equal(actual, expected)
    assert {k: loaded.scheduler_config[k] for k in TINY_SCHEDULER_CONFIG} == TINY_SCHEDULER_CONFIG
    assert SDEDPMSolver(20, **loaded.scheduler_config).timesteps.shape == (20,)  # the samplers take it


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        TinySplatGenerator.from_pretrained(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "generator_config.json") in str(info.value)


def test_default_config_and_unknown_keys():
    generator = TinySplatGenerator.from_config()
    assert generator.latent_shape == (4, 12, TINY_DEFAULT_CONFIG["resolution"], TINY_DEFAULT_CONFIG["resolution"])
    size_mb = sum(p.numel() for p in generator.parameters()) * 4 / 2**20
    assert size_mb < 8
    with pytest.raises(ValueError, match="unknown keys.*'depth'"):
        TinySplatGenerator.from_config({"depth": 3})


def test_prompt_embeds_helpers():
    embeds = PromptEmbeds(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool))
    assert embeds[-1].batch_size == 1 and torch.equal(embeds[-1].embeds, embeds.embeds[2:])
    assert PromptEmbeds.cat([embeds, embeds[0:2]]).batch_size == 5
    with pytest.raises(ValueError, match="share"):
        PromptEmbeds.cat([embeds, PromptEmbeds(torch.randn(1, 4, 8), torch.ones(1, 4))])
    with pytest.raises(ValueError, match="mask"):
        PromptEmbeds(torch.randn(3, 5, 8), torch.ones(3, 4))


# ----------------------------------------------------------------------------- multi-view attention


def _denoiser_outputs(generator, x, **kwargs):
    """Raw denoiser output (B·V, C, h, w) for inputs (B·V, C+6, h, w), one prompt for all views."""
    embeds = generator.encode_prompts(["a red cube"] * x.shape[0])
    with torch.no_grad():
        return generator.denoiser(
            x, encoder_hidden_states=embeds.embeds, encoder_attention_mask=embeds.mask,
            timestep=torch.full((x.shape[0],), 400), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False, **kwargs,
        )[0]  # fmt: skip


def test_mv_attention_mixes_views_and_standard_does_not():
    torch.manual_seed(0)
    generator = TinySplatGenerator.from_config(SMALL).eval()
    x = torch.randn(4, 18, 16, 16)  # one object, 4 views
    x_changed = x.clone()
    x_changed[2] += 1.0  # change view 2 only

    mv = {"cross_attention_kwargs": {"num_views": 4}}
    before, after = _denoiser_outputs(generator, x, **mv), _denoiser_outputs(generator, x_changed, **mv)
    assert (after[0] - before[0]).abs().max() > 1e-3  # view 0 sees view 2

    # Our processor with one view per object is the standard attention
    single = _denoiser_outputs(generator, x, cross_attention_kwargs={"num_views": 1})
    generator.denoiser.set_attn_processor(AttnProcessor2_0())
    standard = _denoiser_outputs(generator, x)
    torch.testing.assert_close(single, standard, rtol=1e-5, atol=1e-5)
    standard_changed = _denoiser_outputs(generator, x_changed)
    assert torch.equal(standard_changed[0], standard[0])  # views independent
    assert not torch.equal(standard_changed[2], standard[2])


def test_mv_attention_checks_its_inputs():
    generator = TinySplatGenerator.from_config(SMALL).eval()
    with pytest.raises(ValueError, match="num_views=3"):
        _denoiser_outputs(generator, torch.randn(4, 18, 16, 16), cross_attention_kwargs={"num_views": 3})
    attn = generator.denoiser.transformer_blocks[0].attn1
    attn.residual_connection = True
    with pytest.raises(ValueError, match="residual_connection"):
        set_mv_attention(generator.denoiser)


def _bf16_outputs(generator, x, upcast: bool, monkeypatch=None, seen=None):
    """The denoiser of ``generator`` in bf16 (``upcast``: Nabla-R2D3's float32 parts) on ``x``; with
    ``seen``, records the dtypes that reach attention and LayerNorm."""
    import copy

    denoiser = set_mv_attention(copy.deepcopy(generator.denoiser).to(torch.bfloat16), upcast_softmax=upcast)
    if seen is not None:
        sdpa, layer_norm = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.layer_norm

        def spy_sdpa(query, key, value, **kwargs):
            kind = "self" if key.shape[-2] == query.shape[-2] else "cross"  # V·n tokens vs the prompt's
            seen.append((kind, query.dtype))
            return sdpa(query, key, value, **kwargs)

        def spy_layer_norm(x, *args, **kwargs):
            seen.append(("layer_norm", x.dtype))
            return layer_norm(x, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
        monkeypatch.setattr(torch.nn.functional, "layer_norm", spy_layer_norm)
    embeds = generator.encode_prompts(["a red cube"] * x.shape[0]).to(dtype=torch.bfloat16)
    with torch.no_grad():
        return denoiser(
            x.bfloat16(), encoder_hidden_states=embeds.embeds, encoder_attention_mask=embeds.mask,
            timestep=torch.full((x.shape[0],), 400), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False, cross_attention_kwargs={"num_views": 4},
        )[0]  # fmt: skip


def test_bf16_upcasts_self_attention_and_two_norms_only(monkeypatch):
    torch.manual_seed(0)
    generator = TinySplatGenerator.from_config(SMALL).eval()
    x = torch.randn(8, 18, 16, 16)  # two objects x 4 views
    reference = _denoiser_outputs(generator, x, cross_attention_kwargs={"num_views": 4})  # float32 weights

    seen = []
    out = _bf16_outputs(generator, x, upcast=True, monkeypatch=monkeypatch, seen=seen)
    layers = SMALL["num_layers"]
    assert out.dtype == torch.bfloat16
    assert seen.count(("self", torch.float32)) == layers and seen.count(("cross", torch.bfloat16)) == layers
    # norm2 of every block and norm_out in float32; norm1 (before self-attention) stays in bf16.
    assert seen.count(("layer_norm", torch.float32)) == layers + 1
    assert seen.count(("layer_norm", torch.bfloat16)) == layers
    monkeypatch.undo()

    plain = _bf16_outputs(generator, x, upcast=False)
    error_upcast = (out.float() - reference).abs().mean()
    error_plain = (plain.float() - reference).abs().mean()
    assert error_upcast < error_plain and error_upcast < 0.05 * reference.abs().mean()