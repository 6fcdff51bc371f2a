"""PickScore, CLIPScore and ImageReward on tiny random-weight instances of the real model classes.

Each is saved in the on-disk layout its real weights come in (a Hugging Face ``CLIPModel``
directory with its processor files; ImageReward's ``ImageReward.pt`` + ``med_config.json`` with a
BERT tokenizer directory) and loaded through the reward's own loader. Nothing is downloaded: the
CLIP tokenizer files are built from the BPE vocabulary open_clip ships. Where the original scorer
is importable (torchmetrics' CLIPScore, the ``image-reward`` package) the scores are checked
against it on the same weights; otherwise those two tests skip.
"""

import functools
import gzip
import importlib.util
import json
import sys
import types

import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from test_rewards_learned import MEAN, PROMPTS, STD, check_directional_derivatives, images_like
from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.models.blip.modeling_blip_text import BlipTextModel

from r2d3ray.rewards import build_reward
from r2d3ray.rewards.clipscore import CLIPScoreReward
from r2d3ray.rewards.imagereward import SCORE_MEAN, SCORE_STD, ImageRewardReward, blip_text_config
from r2d3ray.rewards.pickscore import PickScoreReward

# CLIP ViT shaped but small: 28-px crops (2x2 patches of 14), one layer per tower, the real vocabulary.
TINY_CLIP = CLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=77),
    vision_config=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2),
    projection_dim=16,
)  # fmt: skip
CLIP_CROP = 28


def reference_pixels(images, size):
    """CLIP's val transform on tensors via torchvision: Resize(size, bicubic) + CenterCrop(size) + mean/std."""
    x = TF.resize(images.flatten(0, 1), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(x, size), MEAN, STD)


# ---------------------------------------------------------------- Hugging Face CLIP (PickScore, CLIPScore)


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """(model dir, processor dir): a tiny CLIPModel saved with save_pretrained, and a processor
    directory with the real CLIP BPE tokenizer (vocab.json/merges.txt built as OpenAI's are from
    open_clip's bpe_simple_vocab_16e6) and a preprocessor_config.json. The two towers share a
    final layer-norm offset and projection so that image and text embeddings are positively
    correlated, as a trained CLIP's matching pairs are (with independent random towers every
    cosine may be negative, and CLIPScore's clip at 0 would hide the score and its gradient)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_clip")
    model = CLIPModel(TINY_CLIP)
    with torch.no_grad():
        offset = 2 * torch.randn(32)
        model.vision_model.post_layernorm.bias.copy_(offset)
        model.text_model.final_layer_norm.bias.copy_(offset)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(root / "model")
    processor = root / "processor"
    processor.mkdir()
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]  # fmt: skip
    (processor / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (processor / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(processor / "vocab.json"), str(processor / "merges.txt")).save_pretrained(processor)
    CLIPImageProcessor(size={"shortest_edge": CLIP_CROP}, crop_size={"height": CLIP_CROP, "width": CLIP_CROP}
                       ).save_pretrained(processor)  # fmt: skip
    return root / "model", processor


def clip_reference(model_dir, processor_dir, images, captions):
    """(B, V) cosines and logit scale from CLIPModel.forward on torchvision-preprocessed pixels."""
    B, V = images.shape[:2]
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokens = CLIPTokenizer.from_pretrained(processor_dir)(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=reference_pixels(images, CLIP_CROP))
    logit_scale = model.logit_scale.exp()
    logits = out.logits_per_image.view(B, V, B)  # logit_scale · cos(view, every prompt)
    return logits[torch.arange(B), :, torch.arange(B)] / logit_scale, logit_scale


def test_pickscore_is_logit_scale_times_cosine(clip_dirs):
    model_dir, processor_dir = clip_dirs
    reward = build_reward("pickscore", checkpoint=str(model_dir), processor=str(processor_dir))
    images = images_like(size=40)
    values = reward.score(images, PROMPTS).values
    cosine, logit_scale = clip_reference(model_dir, processor_dir, images, PROMPTS)
    assert values.shape == (2, 2) and values.dtype == torch.float32 and reward.differentiable
    torch.testing.assert_close(values, logit_scale * cosine, rtol=1e-5, atol=1e-5)
    assert (values[0] - values[1]).abs().max() > 1e-4  # the prompt matters


def test_clipscore_is_hessel_w_times_clipped_cosine(clip_dirs):
    model_dir, processor_dir = clip_dirs
    images = images_like(size=40)
    values = build_reward("clipscore", checkpoint=str(model_dir), processor=str(processor_dir)).score(images, PROMPTS).values
    cosine, _ = clip_reference(model_dir, processor_dir, images, [f"A photo depicts {p}" for p in PROMPTS])
    torch.testing.assert_close(values, 2.5 * cosine.clamp(min=0), rtol=1e-5, atol=1e-6)
    assert (values > 0).all() and values.std() > 0
    plain = CLIPScoreReward(model_dir, processor_dir, weight=100, prompt_prefix="").score(images, PROMPTS).values
    cosine, _ = clip_reference(model_dir, processor_dir, images, PROMPTS)
    torch.testing.assert_close(plain, 100 * cosine.clamp(min=0), rtol=1e-5, atol=1e-4)


def test_clipscore_matches_torchmetrics_on_the_same_weights(clip_dirs):
    pytest.importorskip("torchmetrics", reason="the torchmetrics parity check needs `pip install 'r2d3ray[clip-parity]'`")
    from torchmetrics.functional.multimodal import clip_score

    from transformers import CLIPProcessor

    model_dir, processor_dir = clip_dirs

    class TensorFeaturesCLIP(CLIPModel):
        """transformers 4's get_*_features (the projected embedding), which torchmetrics 1.9 expects;
        transformers 5 returns an output object with it as ``pooler_output``."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    def local_model_and_processor():  # torchmetrics' way of taking a model that is not on its hub list
        model = CLIPModel.from_pretrained(model_dir)
        if not isinstance(model.get_text_features(input_ids=torch.ones(1, 2, dtype=torch.long)), torch.Tensor):
            model = TensorFeaturesCLIP.from_pretrained(model_dir)
        return model, CLIPProcessor.from_pretrained(processor_dir)

    # torchmetrics preprocesses uint8 images through CLIPProcessor; ours sees the same values.
    as_uint8 = (images_like(B=2, V=1, size=40) * 255).round().to(torch.uint8)  # (2, 1, 3, 40, 40)
    ours = CLIPScoreReward(model_dir, processor_dir, weight=100, prompt_prefix="")
    ours = ours.score(as_uint8.float() / 255, PROMPTS).values[:, 0]
    theirs = [clip_score(as_uint8[b, 0], PROMPTS[b], local_model_and_processor).item() for b in range(2)]
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=0, atol=0.5)  # PIL's uint8 resize vs ours


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_clip_rewards_gradients_match_finite_differences(clip_dirs, name):
    kwargs = {"prompt_prefix": ""} if name == "clipscore" else {}
    reward = build_reward(name, checkpoint=str(clip_dirs[0]), processor=str(clip_dirs[1]), **kwargs).double()
    x = images_like(B=1, V=2, size=36, dtype=torch.float64)
    out = reward.score(x, PROMPTS[:1], with_grad=True)
    assert (out.values > 0).all()  # CLIPScore's clip at 0 is not where the derivative is checked
    assert out.grads.shape == x.shape and out.grads.abs().sum() > 0
    check_directional_derivatives(lambda y: reward.score(y, PROMPTS[:1]).values.sum(), x, out.grads)


def test_clip_rewards_preprocess_non_square_renders_as_clip_does(clip_dirs):
    model_dir, processor_dir = clip_dirs
    images = images_like(B=1, V=1, size=40)[..., :30]  # (1, 1, 3, 40, 30): shorter side resized, centre crop
    values = PickScoreReward(model_dir, processor_dir).score(images, PROMPTS[:1]).values
    cosine, logit_scale = clip_reference(model_dir, processor_dir, images, PROMPTS[:1])
    torch.testing.assert_close(values, logit_scale * cosine, rtol=1e-5, atol=1e-5)


def test_clip_rewards_errors(clip_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="pickscore: no CLIPModel config.json .*yuvalkirstain/PickScore_v1"):
        PickScoreReward(tmp_path)
    with pytest.raises(FileNotFoundError, match="clipscore: no preprocessor_config.json .*processor directory"):
        CLIPScoreReward(clip_dirs[0])  # the model directory alone, without the processor files
    with pytest.raises(ValueError, match="weight=0"):
        CLIPScoreReward(clip_dirs[0], clip_dirs[1], weight=0)


# ---------------------------------------------------------------- ImageReward

VISION_WIDTH, IMAGE_SIZE, PATCH = 64, 32, 16  # one 64-wide head, 2x2 patches
WORDS = ["a", "red", "wooden", "chair", "small", "blue", "teapot"]
# ImageReward's med_config.json (a BertConfig with cross-attention) at toy depth; the head's input
# stays 768 wide because ImageReward's MLP is built for BERT-base.
TINY_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 1,
    "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 5 + len(WORDS) + 2, "encoder_width": VISION_WIDTH,
    "add_cross_attention": True,
}  # fmt: skip


def tiny_blip_vit():
    """BLIP's vision encoder is timm's VisionTransformer (its vit.py is a copy): same keys, eps 1e-6."""
    return timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=VISION_WIDTH, depth=1, num_heads=1, num_classes=0,
        global_pool="", qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """(checkpoint dir, tokenizer dir, state): ImageReward.pt (the keys of the released file:
    blip.visual_encoder.*, blip.text_encoder.* with its position_ids buffer, the unused BLIP
    projections, mlp.layers.*) + med_config.json, and a BERT uncased tokenizer with a toy vocabulary."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("imagereward")
    text = BlipTextModel(blip_text_config(TINY_MED_CONFIG, VISION_WIDTH), add_pooling_layer=False)
    head = {f"mlp.layers.{i}.{kind}": torch.randn(shape) / shape[-1] ** 0.5
            for i, (fan_out, fan_in) in zip((0, 2, 4, 6, 7), [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)])
            for kind, shape in (("weight", (fan_out, fan_in)), ("bias", (fan_out,)))}  # fmt: skip
    state = {
        **{f"blip.visual_encoder.{k}": v for k, v in tiny_blip_vit().state_dict().items()},
        **{f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()},
        "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
        "blip.vision_proj.weight": torch.randn(256, VISION_WIDTH), "blip.vision_proj.bias": torch.zeros(256),
        "blip.text_proj.weight": torch.randn(256, 768), "blip.text_proj.bias": torch.zeros(256),
        **head,
    }  # fmt: skip
    checkpoint = root / "ImageReward"
    checkpoint.mkdir()
    torch.save(state, checkpoint / "ImageReward.pt")
    (checkpoint / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    tokenizer = root / "bert-base-uncased"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(tokenizer / "vocab.txt"), do_lower_case=True).save_pretrained(tokenizer)
    return checkpoint, tokenizer, state


def test_imagereward_vision_encoder_is_blips_vit(imagereward_files):
    checkpoint, tokenizer, state = imagereward_files
    reward = ImageRewardReward(checkpoint, tokenizer)
    vit = tiny_blip_vit()
    vit.load_state_dict({k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
                         if k.startswith("blip.visual_encoder.")})  # fmt: skip
    pixels = reference_pixels(images_like(size=40), IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(reward.visual_encoder(pixel_values=pixels).last_hidden_state,
                                   vit.forward_features(pixels), rtol=1e-5, atol=1e-5)  # fmt: skip
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [12, 13]  # BLIP's added tokens


def original_imagereward():
    """ImageReward's own BLIP ViT, med.BertModel and scoring code, or skip where the package is absent.

    Its package __init__ imports what a scorer does not need (OpenAI ``clip``, ``datasets``, ReFL's
    training stack), and med.py uses transformers 4 helpers; those are supplied here, with the
    transformers 4 definitions, so the package's model code itself runs unchanged."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        pytest.skip("the image-reward package is not installed (`pip install --no-deps image-reward==1.5 "
                    "fairscale==0.4.13`; its pinned dependencies conflict with r2d3ray's)")
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for package, path in (("ImageReward", spec.submodule_search_locations[0]),
                          ("ImageReward.models", spec.submodule_search_locations[0] + "/models")):
        module = types.ModuleType(package)
        module.__path__ = [path]
        sys.modules.setdefault(package, module)
    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    modeling_utils.__dict__.setdefault("find_pruneable_heads_and_indices", None)  # head pruning, unused
    if importlib.util.find_spec("fairscale") is None:  # its checkpoint_wrapper only wraps for grad checkpointing
        for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = lambda module, **_: module
    from ImageReward.ImageReward import MLP, ImageReward
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    if not hasattr(BertModel, "invert_attention_mask"):  # transformers 4's ModuleUtilsMixin methods
        def invert_attention_mask(self, mask):
            return (1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min

        BertModel.invert_attention_mask = invert_attention_mask
        BertModel.get_head_mask = lambda self, head_mask, num_layers: [None] * num_layers
        BertModel.init_weights = lambda self: self.apply(self._init_weights)
    return MLP, ImageReward, BertConfig, BertModel, VisionTransformer


def test_imagereward_matches_the_original_package_on_the_same_weights(imagereward_files):
    MLP, ImageReward, BertConfig, BertModel, VisionTransformer = original_imagereward()
    checkpoint, tokenizer, state = imagereward_files

    def part(prefix):
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    vit = VisionTransformer(img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=VISION_WIDTH, depth=1, num_heads=1)
    vit.load_state_dict(part("blip.visual_encoder."))
    config = BertConfig.from_dict(TINY_MED_CONFIG)
    bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict(part("blip.text_encoder."), strict=False)  # position_ids is a buffer
    mlp = MLP(768)
    mlp.load_state_dict(part("mlp."))
    original = types.SimpleNamespace(blip=types.SimpleNamespace(visual_encoder=vit.eval(), text_encoder=bert.eval()),
                                     mlp=mlp.eval(), mean=SCORE_MEAN, std=SCORE_STD, device="cpu")  # fmt: skip

    reward = ImageRewardReward(checkpoint, tokenizer)
    images = images_like(size=40)  # (2, 2, 3, 40, 40)
    ours = reward.score(images, PROMPTS).values
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():  # ImageReward.score_gard, the package's differentiable scoring path
        theirs = ImageReward.score_gard(original, tokens["input_ids"].repeat_interleave(2, 0),
                                        tokens["attention_mask"].repeat_interleave(2, 0),
                                        reference_pixels(images, IMAGE_SIZE)).view(2, 2)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_imagereward_scores_depend_on_prompt_and_gradients_match_finite_differences(imagereward_files):
    checkpoint, tokenizer, _ = imagereward_files
    reward = build_reward("imagereward", checkpoint=str(checkpoint), tokenizer=str(tokenizer))
    values = reward.score(images_like(size=40), PROMPTS).values
    assert values.shape == (2, 2) and torch.isfinite(values).all()
    assert (values[0] - values[1]).abs().max() > 1e-4
    reward = reward.double()
    x = images_like(B=1, V=1, size=36, dtype=torch.float64)
    out = reward.score(x, PROMPTS[:1], with_grad=True)
    assert out.grads.abs().sum() > 0
    check_directional_derivatives(lambda y: reward.score(y, PROMPTS[:1]).values.sum(), x, out.grads)


def test_imagereward_errors(imagereward_files, tmp_path):
    checkpoint, tokenizer, _ = imagereward_files
    with pytest.raises(FileNotFoundError, match="imagereward: checkpoint file .*ImageReward.pt.*THUDM/ImageReward"):
        ImageRewardReward(tmp_path, tokenizer)
    with pytest.raises(FileNotFoundError, match="imagereward: tokenizer file .*vocab.txt"):
        ImageRewardReward(checkpoint, tmp_path)
