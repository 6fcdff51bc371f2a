"""LoRA adapters on the tiny prior's denoiser: trainability, enable/disable, switching, diffusers format."""
import json

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from r2d3ray.models import lora
from r2d3ray.models.mv_attention import set_mv_attention
from r2d3ray.models.tiny import TinySplatGenerator

SMALL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, resolution=16, caption_channels=32)
PROMPTS = ["a small red cube", "a flat green torus"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny")
    TinySplatGenerator.from_config(SMALL).save_pretrained(directory)
    return directory


def _load(base_dir):
    return TinySplatGenerator.from_pretrained(base_dir).eval()


def _predict(generator):
    latents = torch.randn(2, *generator.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return generator.predict(latents, torch.tensor([800, 40]), generator.encode_prompts(PROMPTS))


def _randomize(denoiser, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora.adapter_parameters(denoiser, name).values():
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def test_only_adapter_parameters_train_and_fresh_adapter_is_identity(base_dir):
    generator = _load(base_dir)
    base = _predict(generator)
    config = lora.add_lora_adapter(generator.denoiser, "policy")
    assert config.r == 8 and config.lora_alpha == 8 and config.init_lora_weights == "gaussian"
    assert "proj_in" not in config.target_modules and {"to_q", "ff.net.2", "linear_1"} <= set(config.target_modules)

    trainable = {n for n, p in generator.denoiser.named_parameters() if p.requires_grad}
    adapter = lora.adapter_parameters(generator.denoiser, "policy")
    assert trainable and all(".lora_A.policy." in n or ".lora_B.policy." in n for n in trainable)
    assert len(trainable) == len(adapter) and "transformer_blocks.0.attn1.to_q.lora_A.weight" in adapter
    assert torch.equal(_predict(generator), base)  # B = 0 at Gaussian init

    _randomize(generator.denoiser, "policy", seed=1)
    assert not torch.allclose(_predict(generator), base, atol=1e-4)


def test_disabled_adapters_give_the_base_model_exactly(base_dir):
    generator = _load(base_dir)
    base = _predict(generator)
    lora.add_lora_adapter(generator.denoiser, "policy")
    _randomize(generator.denoiser, "policy", seed=2)
    adapted = _predict(generator)
    with lora.adapters_disabled(generator.denoiser):
        assert torch.equal(_predict(generator), base)
        assert not any(p.requires_grad for p in generator.denoiser.parameters())
    assert torch.equal(_predict(generator), adapted)
    assert all(p.requires_grad for p in lora.adapter_parameters(generator.denoiser, "policy").values())


def test_switching_adapters(base_dir):
    generator = _load(base_dir)
    denoiser = generator.denoiser
    lora.add_lora_adapter(denoiser, "policy")
    lora.add_lora_adapter(denoiser, "old")
    _randomize(denoiser, "policy", seed=3)
    _randomize(denoiser, "old", seed=4)
    lora.use_adapter(denoiser, "policy")
    policy = _predict(generator)
    with lora.use_adapter(denoiser, "old"):
        old = _predict(generator)
        assert denoiser.active_adapters() == ["old"]
        assert all(p.requires_grad for p in lora.adapter_parameters(denoiser, "old").values())
        assert not any(p.requires_grad for p in lora.adapter_parameters(denoiser, "policy").values())
    assert denoiser.active_adapters() == ["policy"]
    assert not torch.allclose(policy, old, atol=1e-4)
    assert torch.equal(_predict(generator), policy)

    # copying "policy" into "old" key by key (DiffusionNFT's old-policy update) makes them agree
    old_params, policy_params = (lora.adapter_parameters(denoiser, n) for n in ("old", "policy"))
    assert old_params.keys() == policy_params.keys()
    with torch.no_grad():
        for key, param in old_params.items():
            param.copy_(policy_params[key])
    lora.use_adapter(denoiser, "old")
    assert torch.equal(_predict(generator), policy)
    with pytest.raises(ValueError, match="'missing' is not on the denoiser"):
        lora.use_adapter(denoiser, "missing")


def test_save_and_load_round_trip_in_diffusers_format(base_dir, tmp_path):
    generator = _load(base_dir)
    lora.add_lora_adapter(generator.denoiser, "policy", rank=4, alpha=16)
    _randomize(generator.denoiser, "policy", seed=5)
    expected = _predict(generator)
    path = lora.save_lora(generator.denoiser, tmp_path)

    assert path == tmp_path / "pytorch_lora_weights.safetensors" and (tmp_path / "adapter_config.json").is_file()
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys, metadata = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 16

    # A fresh model through diffusers' load_lora_adapter (rank and alpha from the file)
    fresh = _load(base_dir)
    lora.load_lora(fresh.denoiser, tmp_path, adapter="policy")
    assert fresh.denoiser.peft_config["policy"].lora_alpha == 16
    assert torch.equal(_predict(fresh), expected)

    # Plain peft on diffusers' own PixArt class, from adapter_config.json and the prefixed keys
    transformer = set_mv_attention(PixArtTransformer2DModel.from_pretrained(base_dir / "transformer"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config = LoraConfig(**{k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules")})
    inject_adapter_in_model(config, transformer, adapter_name="x")
    weights = {k.removeprefix("transformer."): v for k, v in safetensors.torch.load_file(str(path)).items()}
    set_peft_model_state_dict(transformer, weights, adapter_name="x")
    plain = _load(base_dir)
    plain.denoiser = transformer.eval()  # same forward, same base weights
    torch.testing.assert_close(_predict(plain), expected, rtol=1e-5, atol=1e-5)


def test_load_into_existing_adapter_keeps_parameters(base_dir, tmp_path):
    generator = _load(base_dir)
    lora.add_lora_adapter(generator.denoiser, "policy")
    _randomize(generator.denoiser, "policy", seed=6)
    expected = _predict(generator)
    lora.save_lora(generator.denoiser, tmp_path)

    params_before = lora.adapter_parameters(generator.denoiser, "policy")
    _randomize(generator.denoiser, "policy", seed=7)
    lora.load_lora(generator.denoiser, tmp_path)  # resume: in place
    params_after = lora.adapter_parameters(generator.denoiser, "policy")
    assert all(params_after[k] is params_before[k] for k in params_before)
    assert torch.equal(_predict(generator), expected)

    other = _load(base_dir)
    lora.add_lora_adapter(other.denoiser, "policy", rank=2)
    with pytest.raises(ValueError, match="different rank or targets"):
        lora.load_lora(other.denoiser, tmp_path)


def test_argument_errors(base_dir, tmp_path):
    denoiser = _load(base_dir).denoiser
    with pytest.raises(ValueError, match="none of"):
        lora.add_lora_adapter(denoiser, target_modules=["conv_nonexistent"])
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora_adapter(denoiser, rank=0)
    with pytest.raises(ValueError, match="PEFT adapter API"):
        lora.add_lora_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        lora.load_lora(denoiser, tmp_path)
    lora.add_lora_adapter(denoiser, "policy")
    with pytest.raises(ValueError, match="already exists"):
        lora.add_lora_adapter(denoiser, "policy")


def test_reference_files_with_unet_prefixed_keys_load(base_dir, tmp_path):
    # Nabla-R2D3 saves with StableDiffusionPipeline.save_lora_weights(unet_lora_layers=...): the peft
    # keys prefixed "unet." and no adapter metadata (rank from the shapes, alpha = rank: scale 1).
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    generator = _load(base_dir)
    lora.add_lora_adapter(generator.denoiser, "policy", rank=4)
    _randomize(generator.denoiser, "policy", seed=8)
    expected = _predict(generator)
    weights = get_peft_model_state_dict(generator.denoiser, adapter_name="policy")
    LoraBaseMixin.write_lora_layers(state_dict=LoraBaseMixin.pack_weights(weights, "unet"), save_directory=str(tmp_path),
                                    is_main_process=True, weight_name="pytorch_lora_weights.safetensors",
                                    save_function=None, safe_serialization=True)
    with safetensors.safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())

    fresh = _load(base_dir)  # a new adapter, through diffusers' loader
    lora.load_lora(fresh.denoiser, tmp_path, adapter="policy")
    assert fresh.denoiser.peft_config["policy"].r == 4
    assert torch.equal(_predict(fresh), expected)

    _randomize(generator.denoiser, "policy", seed=9)  # an existing adapter, in place
    lora.load_lora(generator.denoiser, tmp_path, adapter="policy")
    assert torch.equal(_predict(generator), expected)

    safetensors.torch.save_file({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match="no LoRA keys prefixed 'transformer.' or 'unet.'"):
        lora.load_lora(_load(base_dir).denoiser, tmp_path)
