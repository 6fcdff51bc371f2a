"""The shipped G-Objaverse prompt sets and `r2d3ray prepare-diffsplat` on a tiny release in the real layout."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece
import torch
import yaml

from r2d3ray import cli
from r2d3ray.eval.prompts import PROMPT_SCHEMA, read_prompts, training_prompts
from r2d3ray.models import prepare
from r2d3ray.models.diffsplat import DiffSplatGenerator, PromptCache
from r2d3ray.models.prepare import ENCODER_ID, T5PromptEncoder, cache_prompts, import_reference_cache
from r2d3ray.models.tiny_diffsplat import TINY_TRANSFORMER_CONFIG, write_tiny_release

ROOT = Path(__file__).resolve().parents[1]
PROMPT_DIR = ROOT / "r2d3ray" / "assets" / "prompts"
CAPTIONS = read_prompts(PROMPT_DIR / "g_objaverse_83k.parquet")
WIDTH = TINY_TRANSFORMER_CONFIG["caption_channels"]
# _clean_caption once leaves "ak-47 assault rifle -"; only the second pass drops the dash
TWICE_CLEANED = ("AK-47 Assault Rifle - Free Download", "ak-47 assault rifle")


def test_prompt_sets_are_shipped_and_readable():
    table = pq.read_table(PROMPT_DIR / "g_objaverse_83k.parquet")
    assert table.schema.equals(PROMPT_SCHEMA) and table.num_rows == 83296
    assert set(table.column("split").to_pylist()) == {"train"}
    assert set(table.column("source").to_pylist()) == {"G-Objaverse"}
    # every line in order, duplicates kept: the rows rebuild the original file byte for byte
    original = "".join(line + "\r\n" for line in table.column("prompt").to_pylist()).encode()
    readme = (PROMPT_DIR / "README.md").read_text()
    assert hashlib.sha256(original).hexdigest() in readme and "77483e6f38d9291f2b962230f83ada244998aa96" in readme
    assert "MIT License" in (PROMPT_DIR / "LICENSE-G-Objaverse").read_text()
    assert len(CAPTIONS) == 83296 and CAPTIONS[0] == "Posto BMN Petróleo Logo"
    assert read_prompts(PROMPT_DIR / "g_objaverse_83k_sample.txt") == [
        "low poly a burger.", "A silver teapot.",
        "Kirby, a pink and red sphere with a face and a black hole in the middle.",
        "Blue and gold steampunk telescope on a stand.",
    ]  # fmt: skip
    base = yaml.safe_load((ROOT / "configs" / "diffsplat_pas_base.yaml").read_text())
    assert (ROOT / base["prompts"]["file"]).resolve() == PROMPT_DIR / "g_objaverse_83k.parquet"
    from r2d3ray.config import load_config

    cfg = load_config(None, ["model.kind=diffsplat", f"prompts.file={PROMPT_DIR / 'g_objaverse_83k.parquet'}"])
    assert training_prompts(cfg) == CAPTIONS


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def encoder(release):
    return T5PromptEncoder(release[1])


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    """`prepare-diffsplat --config` on 40 captions plus the config's evaluation prompt; returns (out, config)."""
    tmp = tmp_path_factory.mktemp("prepared")
    (tmp / "prompts.txt").write_text("\n".join([*CAPTIONS[:40], TWICE_CLEANED[0]]))
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"kind": "diffsplat", "path": str(tmp / "model")},
        "prompts": {"file": str(tmp / "prompts.txt")},
        "tracking": {"eval_prompts": ["a tiny red chair"]},
        "sampling": {"num_steps": 2, "batch_size": 2},
    }))  # fmt: skip
    diffsplat, pixart = release
    assert cli.main(["prepare-diffsplat", "--diffsplat", str(diffsplat), "--pixart", str(pixart), "--config", str(config)]) == 0
    return tmp / "model", config


def test_prepare_end_to_end_then_sample(prepared):
    from r2d3ray.config import load_config
    from r2d3ray.infer import build_pipeline, generate

    out, config = prepared
    cache = PromptCache(out / "prompt_cache")
    wanted = {"", *read_prompts(prepare.SAMPLE_PROMPTS), "a tiny red chair", *CAPTIONS[:40], TWICE_CLEANED[0]}
    assert set(cache.index) == wanted and (cache.max_length, cache.embed_dim, cache.encoder) == (300, WIDTH, ENCODER_ID)
    generator = DiffSplatGenerator.from_pretrained(out).eval()
    assert generator.latent_shape == (4, 4, 8, 8)
    pipe = build_pipeline(load_config(str(config)), device="cpu")
    latents = generate(pipe, ["A silver teapot.", "a tiny red chair"], seed=0)
    with torch.no_grad():
        splats = pipe.generator.latents_to_splats(latents)
    assert latents.shape == (2, 4, 4, 8, 8) and splats.validate().num_gaussians == 4 * 64 * 64


def test_cache_holds_t5_of_the_twice_cleaned_caption(prepared, encoder):
    out, _ = prepared
    assert encoder.clean([TWICE_CLEANED[0]]) == [TWICE_CLEANED[1]]
    ids, mask = encoder.tokenize([TWICE_CLEANED[1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = encoder.encoder(ids, attention_mask=mask)[0].float()  # (1, 300, D)
    cached = PromptCache(out / "prompt_cache").lookup([TWICE_CLEANED[0]])
    assert torch.equal(cached.mask, mask) and torch.equal(cached.embeds, direct * mask[..., None])


def test_tokenizer_is_the_slow_sentencepiece_one(release, encoder):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(release[1] / "tokenizer" / "spiece.model"))
    ids, mask = encoder.tokenize(["a silver teapot.", ""])
    expected = processor.encode("a silver teapot.") + [1]  # + </s>, then <pad> = 0
    assert ids[0, : len(expected)].tolist() == expected and ids[0, len(expected) :].eq(0).all()
    assert mask.sum(1).tolist() == [len(expected), 1] and ids[1, 0] == 1  # "": only </s>
    long_ids, long_mask = encoder.tokenize([" ".join(CAPTIONS[:200])])
    assert long_mask.sum() == 300 and long_ids[0, -1] == 1  # cut to 299 tokens + </s>
    from transformers import T5Tokenizer  # the release's tokenizer/ loads as the real one does

    assert T5Tokenizer.from_pretrained(str(release[1] / "tokenizer"))("a silver teapot.").input_ids == expected


def test_t5_has_float32_weights_under_bf16_autocast(encoder):
    assert encoder.encoder.dtype == torch.float32 and encoder.autocast and encoder.device.type == "cpu"
    ids, mask = encoder.tokenize(["a red car"])
    with torch.no_grad():
        fp32 = encoder.encoder(ids, attention_mask=mask)[0][0, :4]  # (4, D)
    embeds = encoder({"prompt": np.array(["a red car"], dtype=object)})["embeds"][0]
    assert embeds.shape == (4, WIDTH) and embeds.dtype == np.float32
    assert not np.array_equal(embeds, fp32.numpy())  # bf16 matmuls, yet close to float32
    np.testing.assert_allclose(embeds, fp32.numpy(), atol=0.1)


def test_rerun_encodes_nothing_and_redoes_nothing(prepared, release, monkeypatch, capsys):
    out, config = prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(prepare, "T5PromptEncoder", lambda *a, **k: pytest.fail("T5 loaded on a re-run"))
    diffsplat, pixart = release
    assert cli.main(["prepare-diffsplat", "--diffsplat", str(diffsplat), "--pixart", str(pixart), "--config", str(config)]) == 0
    assert "0 newly encoded" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_interrupted_cache_resumes_shard_by_shard(prepared, release, encoder, tmp_path, monkeypatch):
    prompts = CAPTIONS[100:125]
    assert cache_prompts(release[1], prompts[:20], tmp_path, batch_size=4, shard_size=10) == 20
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    (tmp_path / "deadbeef.partial").write_bytes(b"a shard cut short by a kill")
    PromptCache(tmp_path).index[prompts[10]][0].unlink()  # killed while writing the second shard

    encoded = []
    monkeypatch.setattr(prepare, "T5PromptEncoder", lambda *a, **k: lambda batch: encoded.extend(batch["prompt"]) or encoder(batch))
    assert cache_prompts(release[1], prompts, tmp_path, batch_size=4, shard_size=10) == 15
    assert encoded == prompts[10:]
    cache = PromptCache(tmp_path)
    assert set(cache.index) == set(prompts)
    direct = encoder({"prompt": np.array(prompts[12:13], dtype=object)})["embeds"][0]
    assert torch.equal(cache.lookup(prompts[12:13]).embeds[0, : len(direct)], torch.from_numpy(direct))


def _write_reference_cache(directory: Path, prompts: list[str], per_shard: int, width: int):
    """The reference notebook's files: prompt txt, {first:05d}-{last:05d} shards of flattened tokens and masks."""
    directory.mkdir()
    (directory / "G-obj-83k.txt").write_text("".join(p + "\r\n" for p in prompts))
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (len(prompts),), generator=generator)
    mask = (torch.arange(300) < lengths[:, None]).long()  # (P, 300)
    embeds = torch.randn(len(prompts), 300, width, generator=generator) * mask[..., None]  # (P, 300, D)
    for start in range(0, len(prompts), per_shard):
        rows = slice(start, start + per_shard)
        flat_embeds, flat_mask = embeds[rows].flatten(0, 1), mask[rows].flatten()  # (P·300, D), (P·300,)
        name = f"{start + 1:05d}-{min(start + per_shard, len(prompts)):05d}"
        torch.save(flat_embeds[flat_mask == 1], directory / f"{name}prompt_embeds.pt")
        torch.save(flat_mask, directory / f"{name}prompt_attention_masks.pt")
    negative_mask = (torch.arange(300) < 1).long()[None]  # (1, 300)
    torch.save(torch.randn(1, 300, width, generator=generator) * negative_mask[..., None], directory / "negative_prompt_embeds.pt")
    torch.save(negative_mask, directory / "negative_prompt_attention_mask.pt")
    return embeds, mask


def test_reference_cache_is_imported_equal(tmp_path):
    prompts = [*CAPTIONS[:9], CAPTIONS[2]]  # a duplicate, as in G-obj-83k.txt
    embeds, mask = _write_reference_cache(tmp_path / "reference", prompts, per_shard=4, width=16)
    assert import_reference_cache(tmp_path / "reference", tmp_path / "cache") == 10  # 9 distinct + ""
    cache = PromptCache(tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4 and cache.encoder == ENCODER_ID
    looked_up = cache.lookup(prompts[:9])
    assert torch.equal(looked_up.embeds, embeds[:9]) and torch.equal(looked_up.mask, mask[:9])
    negative = cache.lookup([""])
    assert torch.equal(negative.embeds, torch.load(tmp_path / "reference" / "negative_prompt_embeds.pt"))
    assert import_reference_cache(tmp_path / "reference", tmp_path / "cache") == 0  # nothing new the second time

    (tmp_path / "reference" / "00005-00008prompt_attention_masks.pt").unlink()
    with pytest.raises(FileNotFoundError, match="00005-00008prompt_attention_masks.pt is missing"):
        import_reference_cache(tmp_path / "reference", tmp_path / "other")


def test_prepare_with_the_reference_cache_encodes_only_the_rest(release, tmp_path):
    _write_reference_cache(tmp_path / "reference", CAPTIONS[:6], per_shard=4, width=WIDTH)
    (tmp_path / "more.txt").write_text("\n".join(CAPTIONS[:8]))
    diffsplat, pixart = release
    assert cli.main(["prepare-diffsplat", "--diffsplat", str(diffsplat), "--pixart", str(pixart), "--out", str(tmp_path / "m"),
                     "--reference-cache", str(tmp_path / "reference"), "--prompts", str(tmp_path / "more.txt")]) == 0
    cache = PromptCache(tmp_path / "m" / "prompt_cache")
    assert set(cache.index) == {"", *read_prompts(prepare.SAMPLE_PROMPTS), *CAPTIONS[:8]}
    assert DiffSplatGenerator.from_pretrained(tmp_path / "m").encode_prompts(CAPTIONS[5:7]).batch_size == 2


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_missing_inputs_give_one_clear_error_line(release, tmp_path, capsys):
    diffsplat, pixart = release
    args = ["prepare-diffsplat", "--out", str(tmp_path / "out")]
    err = _error(capsys, [*args, "--diffsplat", str(tmp_path / "nowhere"), "--pixart", str(pixart)])
    assert "nowhere is not a directory" in err and "download_ckpt.py --model_type pas" in err

    broken = tmp_path / "DiffSplat"
    shutil.copytree(diffsplat, broken)
    shutil.rmtree(broken / prepare.GSVAE_CHECKPOINTS / "039030")
    err = _error(capsys, [*args, "--diffsplat", str(broken), "--pixart", str(pixart)])
    assert f"{broken / prepare.GSVAE_CHECKPOINTS}/<iteration>/model.safetensors" in err

    no_tokenizer = tmp_path / "pixart"
    shutil.copytree(pixart, no_tokenizer, ignore=shutil.ignore_patterns("spiece.model"))
    err = _error(capsys, [*args, "--diffsplat", str(diffsplat), "--pixart", str(no_tokenizer)])
    assert "tokenizer/spiece.model is missing" in err and "pixart_sigma_sdxlvae_T5_diffusers" in err

    err = _error(capsys, [*args, "--diffsplat", str(diffsplat), "--pixart", str(pixart), "--prompts", str(tmp_path / "p.txt")])
    assert "p.txt' does not exist" in err
    err = _error(capsys, ["prepare-diffsplat", "--diffsplat", str(diffsplat), "--pixart", str(pixart)])
    assert "--out is required" in err
    assert not (tmp_path / "out" / "prompt_cache").exists()


def test_newest_checkpoint_iteration_is_used(release, tmp_path):
    diffsplat = tmp_path / "DiffSplat"
    shutil.copytree(release[0], diffsplat)
    (diffsplat / prepare.GSVAE_CHECKPOINTS / "000100").mkdir()
    (diffsplat / prepare.GSVAE_CHECKPOINTS / "000100" / "model.safetensors").write_bytes(b"older, not read")
    found = prepare.newest_checkpoint(diffsplat / prepare.GSVAE_CHECKPOINTS, "model.safetensors", "GS-VAE")
    assert found == diffsplat / prepare.GSVAE_CHECKPOINTS / "039030" / "model.safetensors"


@pytest.mark.slow
def test_ray_data_encoding_matches_local(release, encoder, tmp_path):
    import ray

    prompts = CAPTIONS[200:212]
    try:
        assert cache_prompts(release[1], prompts, tmp_path, batch_size=5, shard_size=8, address="local", num_encoders=1) == 12
    finally:
        ray.shutdown()
    cache = PromptCache(tmp_path)
    local = encoder({"prompt": np.array(prompts, dtype=object)})["embeds"]
    looked_up = cache.lookup(prompts)
    for row, tokens in enumerate(local):
        assert torch.equal(looked_up.embeds[row, : len(tokens)], torch.from_numpy(tokens))
