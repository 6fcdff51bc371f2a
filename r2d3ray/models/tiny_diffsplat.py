"""A random-weight DiffSplat release at toy sizes, in the real on-disk layout, for tests and CI.

``write_tiny_release(root)`` writes what ``r2d3ray prepare-diffsplat`` reads, with the real
classes: DiffSplat's download (the multi-view PixArt transformer's ``transformer_ema`` and the
GSAutoencoderKL accelerate checkpoint with its ``vae.`` and ``tiny_decoder.`` weights) and the
PixArt-Σ pipeline directory (a sentencepiece ``spiece.model`` trained here on shipped captions, a
T5 encoder as wide as the transformer's ``caption_channels``, the SDXL-shaped VAE, the scheduler).
About 1 MB, written in a few seconds; the weights are random, so samples are noise.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DPMSolverMultistepScheduler

from r2d3ray.models.diffsplat import SPLATTER_CHANNELS
from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel
from r2d3ray.models.prepare import GSVAE_CHECKPOINTS, TRANSFORMER_CHECKPOINTS
from r2d3ray.models.schedulers import PIXART_SIGMA_SCHEDULER_CONFIG

# latent 8x8 per view (x8 VAE -> 64x64 splatter images), in 4 latent + 6 Plücker channels, out ε + variance
TINY_TRANSFORMER_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=10, out_channels=8, num_layers=2, cross_attention_dim=16,
    sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single", use_additional_conditions=False,
    interpolation_scale=1,
)  # fmt: skip
# The SDXL VAE's architecture (4 levels, x8, 4 latent channels, its scaling factor) at toy widths.
TINY_SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    norm_num_groups=4, sample_size=64, scaling_factor=0.13025,
)  # fmt: skip
# The GS-VAE: the SDXL VAE with 12-channel conv_in/conv_out for splatter images.
TINY_GSVAE_CONFIG = {**TINY_SDXL_VAE_CONFIG, "in_channels": SPLATTER_CHANNELS, "out_channels": SPLATTER_CHANNELS}
TINY_T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
T5_EXTRA_IDS = 100  # T5's <extra_id_*> tokens, after the sentencepiece vocabulary
TRANSFORMER_ITERATION, GSVAE_ITERATION = "013020", "039030"  # the released checkpoints' iterations


def _train_spiece_model(captions: list[str], vocab_size: int) -> bytes:
    """A unigram sentencepiece model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no <s>)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def write_tiny_release(root: str | os.PathLike, seed: int = 0, num_captions: int = 400) -> tuple[Path, Path]:
    """Write ``root/DiffSplat`` and ``root/pixart_sigma_sdxlvae_T5_diffusers``; returns the two directories."""
    from transformers import T5Config, T5EncoderModel

    from r2d3ray.eval.prompts import read_prompts

    root = Path(root)
    diffsplat, pixart = root / "DiffSplat", root / "pixart_sigma_sdxlvae_T5_diffusers"
    torch.manual_seed(seed)

    transformer_dir = diffsplat / TRANSFORMER_CHECKPOINTS / TRANSFORMER_ITERATION / "transformer_ema"
    PixArtTransformerMV2DModel.from_config(TINY_TRANSFORMER_CONFIG).save_pretrained(str(transformer_dir))

    # GSAutoencoderKL: the SDXL VAE with 12-channel conv_in/conv_out under "vae.", and TAESD's
    # decoder with a 12-channel last conv under "tiny_decoder."; accelerate saves the module's state.
    gsvae = AutoencoderKL.from_config(TINY_GSVAE_CONFIG)
    tiny_decoder = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                   num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).decoder  # fmt: skip
    tiny_decoder.layers[-1] = torch.nn.Conv2d(tiny_decoder.layers[-1].in_channels, 12, kernel_size=3, padding=1)
    state = {**{f"vae.{k}": v for k, v in gsvae.state_dict().items()},
             **{f"tiny_decoder.{k}": v for k, v in tiny_decoder.state_dict().items()}}  # fmt: skip
    gsvae_file = diffsplat / GSVAE_CHECKPOINTS / GSVAE_ITERATION / "model.safetensors"
    gsvae_file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(gsvae_file))

    tokenizer_dir = pixart / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    captions = read_prompts(Path(__file__).resolve().parents[1] / "assets" / "prompts" / "g_objaverse_83k.parquet")
    spiece = _train_spiece_model(captions[:num_captions], vocab_size=500)
    (tokenizer_dir / "spiece.model").write_bytes(spiece)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    extra_ids = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps({**special, "additional_special_tokens": extra_ids}))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": T5_EXTRA_IDS, "additional_special_tokens": extra_ids,
         "model_max_length": 300, "legacy": True, "sp_model_kwargs": {}, **special}
    ))  # fmt: skip

    vocab_size = 500 + T5_EXTRA_IDS
    T5EncoderModel(T5Config(vocab_size=vocab_size, **TINY_T5_CONFIG)).save_pretrained(str(pixart / "text_encoder"))
    AutoencoderKL.from_config(TINY_SDXL_VAE_CONFIG).save_pretrained(str(pixart / "vae"))
    DPMSolverMultistepScheduler.from_config(PIXART_SIGMA_SCHEDULER_CONFIG).save_config(str(pixart / "scheduler"))
    return diffsplat, pixart
