"""``r2d3ray prepare-diffsplat``: a DiffSplat model directory from the released files.

Inputs (nothing is downloaded):

    --diffsplat DIR   chenguolin/DiffSplat as its ``download_ckpt.py --model_type pas`` fetches it:
        gsdiff_gobj83k_pas_fp16__render/checkpoints/<iter>/transformer_ema/config.json
                                                     .../diffusion_pytorch_model*.safetensors (+ index when sharded)
        gsvae_gobj265k_sdxl_fp16/checkpoints/<iter>/model.safetensors   (an accelerate checkpoint)
      the newest <iter> of each is used (the release has 013020 and 039030).
    --pixart DIR      PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers: tokenizer/spiece.model,
                      text_encoder/ (T5-XXL), vae/config.json (the SDXL VAE), scheduler/

Output: the layout of :mod:`r2d3ray.models.diffsplat` (``transformer/``, ``gsvae/``, ``scheduler/``,
``prompt_cache/``). Each step is skipped when its output is already there; directories are written
under a temporary name and renamed, so an interrupted run never leaves half a step behind.

The prompt embeddings are made as the reference's cache notebook made them (PixArt-Σ's
``encode_prompt(..., clean_caption=True)``, max 300 tokens):

* the caption is cleaned by diffusers' own PixArt code, ``_text_preprocessing(clean_caption=True)``,
  which applies ``_clean_caption`` twice (it needs ``beautifulsoup4`` and ``ftfy``);
* it is tokenized as transformers 4.x's slow, sentencepiece ``T5Tokenizer`` does: the
  ``spiece.model`` ids, cut to 299, then ``</s>``, padded with ``<pad>`` to 300. transformers 5
  only has the ``tokenizers``-backed T5Tokenizer, so ``spiece.model`` is read with sentencepiece
  itself (cleaned captions hold no special tokens: the HTML scrubbing removes ``<...>``);
* T5 runs with float32 weights under bfloat16 autocast, on CUDA as the reference did and on CPU
  too (so the numbers match wherever it runs; CUDA without bf16 runs plain float32). The last
  hidden state is stored in float32, the dtype ``encode_prompt`` returned to the reference.

The cache is written in shards of 1000 prompts; a re-run encodes only the prompts not yet cached,
so an interrupted run loses at most one shard. With ``--address`` the encoding runs on a Ray
cluster with Ray Data, one T5 per GPU.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from r2d3ray.models.diffsplat import (
    PROMPT_CACHE_DIR,
    T5_MAX_LENGTH,
    PromptCache,
    convert_gsvae,
    write_prompt_tokens_shard,
)
from r2d3ray.models.generator import SCHEDULER_DIR

TRANSFORMER_CHECKPOINTS = "gsdiff_gobj83k_pas_fp16__render/checkpoints"
GSVAE_CHECKPOINTS = "gsvae_gobj265k_sdxl_fp16/checkpoints"
PIXART_FILES = ["tokenizer/spiece.model", "text_encoder/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
SAMPLE_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "g_objaverse_83k_sample.txt"
# The cache's encoder id: the recipe above with this text encoder (all shards of a cache must agree).
ENCODER_ID = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
SHARD_SIZE = 1000
GET_DIFFSPLAT = ("download it with DiffSplat's `python download_ckpt.py --model_type pas --local_dir DIR` "
                 "(Hugging Face chenguolin/DiffSplat) and pass that DIR as --diffsplat")
GET_PIXART = ("download PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (e.g. `huggingface-cli download "
              "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers --local-dir DIR`) and pass that DIR as --pixart")


class T5PromptEncoder:
    """PixArt-Σ's prompt encoding as the reference ran it (module docstring); a Ray Data ``map_batches`` class.

    ``encoder({"prompt": array of P str})`` -> ``{"prompt": ..., "embeds": P arrays (n_i, D) float32}``:
    each prompt's unmasked tokens, n_i = its attention-mask sum.
    """

    def __init__(self, pixart_dir: str | os.PathLike, device: str | None = None, max_length: int = T5_MAX_LENGTH):
        import sentencepiece
        from diffusers import PixArtSigmaPipeline
        from diffusers.utils import is_bs4_available, is_ftfy_available
        from transformers import T5EncoderModel

        if not (is_bs4_available() and is_ftfy_available()):
            # diffusers would silently fall back to lower-casing, which changes the embeddings.
            raise ImportError("PixArt's caption cleaning needs beautifulsoup4 and ftfy: pip install beautifulsoup4 ftfy")
        pixart_dir = Path(pixart_dir)
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.sentencepiece = sentencepiece.SentencePieceProcessor(model_file=str(pixart_dir / "tokenizer" / "spiece.model"))
        self.eos_id, self.pad_id = self.sentencepiece.piece_to_id("</s>"), self.sentencepiece.piece_to_id("<pad>")
        encoder = T5EncoderModel.from_pretrained(str(pixart_dir / "text_encoder"), dtype=torch.float32)
        self.encoder = encoder.to(self.device, torch.float32).eval()
        self.autocast = self.device.type == "cpu" or torch.cuda.is_bf16_supported()
        # The cleaning methods use no pipeline state, so an instance without weights suffices.
        self.pipeline_without_weights = object.__new__(PixArtSigmaPipeline)

    def clean(self, prompts: list[str]) -> list[str]:
        """PixArt's ``_clean_caption`` applied twice, exactly as ``encode_prompt(clean_caption=True)`` does."""
        return self.pipeline_without_weights._text_preprocessing(list(prompts), clean_caption=True)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (P, L) and attention masks (P, L), as the slow T5Tokenizer's
        ``padding="max_length", truncation=True, add_special_tokens=True``."""
        ids = [self.sentencepiece.encode(text)[: self.max_length - 1] + [self.eos_id] for text in texts]
        padded = torch.full((len(ids), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), self.max_length, dtype=torch.long)
        for row, tokens in enumerate(ids):
            padded[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return padded, mask

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        ids, mask = self.tokenize(self.clean(prompts))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.encoder(ids.to(self.device), attention_mask=mask.to(self.device))[0]  # (P, L, D)
        hidden = hidden.float().cpu()
        embeds = np.empty(len(prompts), dtype=object)
        for row, length in enumerate(mask.sum(1).tolist()):
            embeds[row] = hidden[row, :length].numpy()  # (n_i, D)
        return {"prompt": np.array(prompts, dtype=object), "embeds": embeds}


def cached_prompts(cache_dir: str | os.PathLike, embed_dim: int) -> set[str]:
    """The prompts already in ``cache_dir``; ValueError when it holds another encoder's embeddings."""
    cache_dir = Path(cache_dir)
    if not any(cache_dir.glob("*.safetensors")):
        return set()
    cache = PromptCache(cache_dir)
    if (cache.max_length, cache.embed_dim, cache.encoder) != (T5_MAX_LENGTH, embed_dim, ENCODER_ID):
        raise ValueError(
            f"prompt cache {cache_dir} holds embeddings of (max_length, dim, encoder)="
            f"{(cache.max_length, cache.embed_dim, cache.encoder)}, not {(T5_MAX_LENGTH, embed_dim, ENCODER_ID)}; "
            "remove that directory or choose another --out"
        )
    return set(cache.index)


def _encode_here(pixart_dir: Path, prompts: list[str], batch_size: int) -> Iterator[tuple[list[str], list]]:
    encoder = T5PromptEncoder(pixart_dir)
    for start in range(0, len(prompts), batch_size):
        out = encoder({"prompt": np.array(prompts[start : start + batch_size], dtype=object)})
        yield list(out["prompt"]), list(out["embeds"])


def _encode_with_ray(pixart_dir: Path, prompts: list[str], batch_size: int, address: str,
                     num_encoders: int | None) -> Iterator[tuple[list[str], list]]:  # fmt: skip
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows one bar
    encoded = ray.data.from_items([{"prompt": p} for p in prompts]).map_batches(
        T5PromptEncoder,
        fn_constructor_kwargs={"pixart_dir": str(pixart_dir)},
        batch_size=batch_size,
        num_gpus=1 if gpus else 0,
        concurrency=num_encoders or max(gpus, 1),
    )
    for batch in encoded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield [str(p) for p in batch["prompt"]], list(batch["embeds"])


def cache_prompts(
    pixart_dir: str | os.PathLike,
    prompts: list[str],
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    shard_size: int = SHARD_SIZE,
    address: str | None = None,
    num_encoders: int | None = None,
) -> int:
    """Encode the ``prompts`` not yet in ``cache_dir`` and add them in shards of ``shard_size``.

    Returns how many prompts were encoded. ``address`` (a Ray cluster address, or "local" for a
    new local instance) encodes with Ray Data on ``num_encoders`` T5 replicas (default: one per
    GPU of the cluster); without it, on this machine (CUDA when available).
    """
    from tqdm import tqdm
    from transformers import T5Config

    pixart_dir, cache_dir = Path(pixart_dir), Path(cache_dir)
    embed_dim = T5Config.from_pretrained(str(pixart_dir / "text_encoder")).d_model
    done = cached_prompts(cache_dir, embed_dim)
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if not todo:
        return 0
    batches = (_encode_with_ray(pixart_dir, todo, batch_size, address, num_encoders) if address
               else _encode_here(pixart_dir, todo, batch_size))  # fmt: skip
    pending_prompts, pending_embeds = [], []

    def write_shard():
        tokens = [torch.from_numpy(np.array(e, dtype=np.float32)) for e in pending_embeds[:shard_size]]  # (n_i, D)
        write_prompt_tokens_shard(cache_dir, pending_prompts[:shard_size], tokens, T5_MAX_LENGTH, ENCODER_ID)
        del pending_prompts[:shard_size], pending_embeds[:shard_size]

    with tqdm(total=len(todo), desc="T5 prompt embeddings", unit="prompt") as bar:
        for batch_prompts, batch_embeds in batches:
            pending_prompts += batch_prompts
            pending_embeds += batch_embeds
            bar.update(len(batch_prompts))
            while len(pending_prompts) >= shard_size:
                write_shard()
        if pending_prompts:
            write_shard()
    return len(todo)


def import_reference_cache(reference_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> int:
    """Add Nabla-R2D3's cached embeddings (its ``cache_embedding.ipynb``) to ``cache_dir``; returns prompts added.

    The reference's directory holds its prompt list (the one ``*.txt``; line i is prompt i),
    shards of 1000 prompts in order, ``{first:05d}-{last:05d}prompt_embeds.pt`` (T, 4096): the
    unmasked tokens of the shard's prompts concatenated, and ``...prompt_attention_masks.pt``
    (P·300,): their masks flattened, and the negative "" as ``negative_prompt_embeds.pt`` (1, 300,
    4096) and ``negative_prompt_attention_mask.pt`` (1, 300). Each shard becomes one of ours.
    """
    reference_dir, cache_dir = Path(reference_dir), Path(cache_dir)
    texts = sorted(reference_dir.glob("*.txt")) if reference_dir.is_dir() else []
    if len(texts) != 1:
        raise FileNotFoundError(
            f"--reference-cache {reference_dir}: expected the reference's cache directory with exactly one prompt "
            f"list (*.txt) beside its *prompt_embeds.pt files, found {[t.name for t in texts]}"
        )
    lines = [line.strip() for line in texts[0].read_text(encoding="utf-8").splitlines()]
    # Shards by their first prompt's number; the names, not a sort, pair embeddings and masks.
    shards = sorted(reference_dir.glob("*-*prompt_embeds.pt"), key=lambda p: int(p.name.split("-")[0]))
    negative = [reference_dir / "negative_prompt_embeds.pt", reference_dir / "negative_prompt_attention_mask.pt"]
    for path in [*negative, *(p.with_name(p.name.replace("prompt_embeds", "prompt_attention_masks")) for p in shards)]:
        if not path.is_file():
            raise FileNotFoundError(f"--reference-cache {reference_dir}: {path.name} is missing; the reference's "
                                    "cache notebook writes it beside the prompt embeddings")
    embed_dim = torch.load(negative[0]).shape[-1]
    known = cached_prompts(cache_dir, embed_dim)
    added, offset = 0, 0
    for shard in shards:
        tokens = torch.load(shard)  # (T, D)
        mask = torch.load(shard.with_name(shard.name.replace("prompt_embeds", "prompt_attention_masks")))  # (P·L,)
        if mask.numel() % T5_MAX_LENGTH or tokens.shape[0] != int(mask.sum()):
            raise ValueError(f"{shard}: {tokens.shape[0]} token embeddings for a mask of {mask.numel()} entries "
                             f"({int(mask.sum())} ones); expected prompts x {T5_MAX_LENGTH} mask entries")
        lengths = mask.reshape(-1, T5_MAX_LENGTH).long().sum(1)  # (P,)
        if offset + len(lengths) > len(lines):
            raise ValueError(f"{shard}: the shards hold more prompts than the {len(lines)} lines of {texts[0].name}")
        starts = [0, *lengths.cumsum(0).tolist()]
        keep = {}  # prompt -> (n_i, D), first occurrence
        for row, prompt in enumerate(lines[offset : offset + len(lengths)]):
            if prompt not in known and prompt not in keep:
                keep[prompt] = tokens[starts[row] : starts[row + 1]].float()
        if keep:
            write_prompt_tokens_shard(cache_dir, list(keep), list(keep.values()), T5_MAX_LENGTH, ENCODER_ID)
        known |= set(keep)
        added += len(keep)
        offset += len(lengths)
    if "" not in known:
        embeds, mask = torch.load(negative[0]), torch.load(negative[1])  # (1, L, D), (1, L)
        write_prompt_tokens_shard(cache_dir, [""], [embeds[0][mask[0].bool()].float()], T5_MAX_LENGTH, ENCODER_ID)
        added += 1
    return added


def newest_checkpoint(checkpoints: Path, inside: str, what: str) -> Path:
    """``checkpoints/<iteration>/<inside>`` of the largest iteration that has it."""
    iterations = [d for d in checkpoints.iterdir() if d.name.isdigit() and (d / inside).exists()] if checkpoints.is_dir() else []
    if not iterations:
        raise FileNotFoundError(f"{what} not found: looked for {checkpoints}/<iteration>/{inside}; {GET_DIFFSPLAT}")
    return max(iterations, key=lambda d: int(d.name)) / inside


def prompts_to_cache(prompt_files: list[str | os.PathLike], prompts: list[str] = ()) -> list[str]:
    """"" (CFG's negative), the shipped sample prompts, ``prompts``, then every file's prompts; unique, in order."""
    from r2d3ray.eval.prompts import read_prompts

    everything = ["", *read_prompts(SAMPLE_PROMPTS), *prompts]
    for path in prompt_files:
        everything += read_prompts(path)
    return list(dict.fromkeys(everything))


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    partial.rename(target)


def _link_or_copy(files: list[Path], out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    for file in files:
        try:
            os.link(file, out_dir / file.name)  # the weights are never written in place: sharing is safe
        except OSError:
            shutil.copy2(file, out_dir / file.name)


def prepare_diffsplat(
    diffsplat_dir: str | os.PathLike,
    pixart_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    prompts: list[str],
    reference_cache: str | os.PathLike | None = None,
    batch_size: int = 64,
    address: str | None = None,
    num_encoders: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write (or complete) the model directory ``out_dir`` from the released files; returns it."""
    from diffusers import DPMSolverMultistepScheduler
    from transformers import T5Config

    diffsplat_dir, pixart_dir, out = Path(diffsplat_dir), Path(pixart_dir), Path(out_dir)
    if not diffsplat_dir.is_dir():
        raise FileNotFoundError(f"--diffsplat {diffsplat_dir} is not a directory; {GET_DIFFSPLAT}")
    transformer_dir = newest_checkpoint(diffsplat_dir / TRANSFORMER_CHECKPOINTS, "transformer_ema/config.json",
                                        "DiffSplat's PixArt-Σ transformer").parent  # fmt: skip
    gsvae_file = newest_checkpoint(diffsplat_dir / GSVAE_CHECKPOINTS, "model.safetensors", "DiffSplat's GS-VAE")
    for relative in PIXART_FILES:
        if not (pixart_dir / relative).is_file():
            raise FileNotFoundError(f"--pixart {pixart_dir}: {relative} is missing; {GET_PIXART}")
    weights = sorted(transformer_dir.glob("*.safetensors")) + sorted(transformer_dir.glob("*.safetensors.index.json"))
    if not weights:
        raise FileNotFoundError(f"no weights in {transformer_dir}: expected diffusion_pytorch_model*.safetensors; {GET_DIFFSPLAT}")
    caption_channels = json.loads((transformer_dir / "config.json").read_text()).get("caption_channels")
    t5_width = T5Config.from_pretrained(str(pixart_dir / "text_encoder")).d_model
    if caption_channels != t5_width:
        raise ValueError(f"{transformer_dir}/config.json has caption_channels={caption_channels} but the T5 of "
                         f"{pixart_dir}/text_encoder is {t5_width} wide; pass the PixArt-Σ pipeline this model was trained with")

    out.mkdir(parents=True, exist_ok=True)
    if (out / "transformer").is_dir():
        log(f"transformer: {out / 'transformer'} is there")
    else:
        _write_atomically(out / "transformer", lambda d: _link_or_copy([transformer_dir / "config.json", *weights], d))
        log(f"transformer: {transformer_dir} -> {out / 'transformer'}")
    if (out / "gsvae").is_dir():
        log(f"gsvae: {out / 'gsvae'} is there")
    else:
        _write_atomically(out / "gsvae", lambda d: convert_gsvae(gsvae_file, pixart_dir / "vae" / "config.json", d))
        log(f"gsvae: {gsvae_file} -> {out / 'gsvae'}")
    if (out / SCHEDULER_DIR / "scheduler_config.json").is_file():
        log(f"scheduler: {out / SCHEDULER_DIR} is there")
    else:
        scheduler = DPMSolverMultistepScheduler.from_pretrained(str(pixart_dir / "scheduler"))
        scheduler.save_config(str(out / SCHEDULER_DIR))
        log(f"scheduler: {pixart_dir / 'scheduler'} -> {out / SCHEDULER_DIR}")

    cache_dir = out / PROMPT_CACHE_DIR
    if reference_cache is not None:
        added = import_reference_cache(reference_cache, cache_dir)
        log(f"prompt cache: imported {added} prompts from {reference_cache}")
    encoded = cache_prompts(pixart_dir, prompts, cache_dir, batch_size=batch_size, address=address,
                            num_encoders=num_encoders)  # fmt: skip
    log(f"prompt cache: {len(set(prompts))} prompts wanted, {encoded} newly encoded, "
        f"{len(PromptCache(cache_dir).index)} in {cache_dir}")
    return out

