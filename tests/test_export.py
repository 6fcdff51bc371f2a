"""`r2d3ray export` on checkpoints in the training run's layout: the committed tiny prior and a tiny
random-weight DiffSplat, each with a LoRA whose B weights are far from zero (so it changes samples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from r2d3ray.cli import main
from r2d3ray.config import build_config
from r2d3ray.errors import UserError
from r2d3ray.export import ExportError, export_run
from r2d3ray.infer import build_pipeline, generate
from r2d3ray.models.loading import TINY_PRIOR_DIR, load_generator
from r2d3ray.models.lora import add_lora_adapter, adapter_parameters, load_lora, save_lora
from r2d3ray.models.prepare import prepare_diffsplat
from r2d3ray.models.tiny_diffsplat import write_tiny_release

REPO = Path(__file__).resolve().parents[1]
TINY_PROMPTS = ["a red cube", "a small blue sphere"]
DIFFSPLAT_PROMPTS = ["a wooden chair", "a red sports car"]


def write_checkpoint(cfg, run_dir: Path, seed: int) -> Path:
    """A run directory holding one checkpoint as training leaves it: lora/ (diffusers layout) and state.json."""
    generator = load_generator(cfg, "cpu")
    torch.manual_seed(seed)
    add_lora_adapter(generator.denoiser, "policy", rank=4)
    with torch.no_grad():
        for name, param in adapter_parameters(generator.denoiser, "policy").items():
            if "lora_B" in name:  # A is already Gaussian; B = 0 would leave the model unchanged. 0.03 changes the
                # samples completely (by ~1 in means and colours) while keeping the network in a sane range
                param.normal_(0.0, 0.03)
    checkpoint = run_dir / "checkpoint_2026-11-30_12-00-00.000000"
    save_lora(generator.denoiser, checkpoint / "lora", adapter="policy")
    (checkpoint / "state.json").write_text(json.dumps({"epoch": 3, "global_step": 6, "mlflow_run_id": "abc123",
                                                       "config": cfg.model_dump(mode="json")}))
    return checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_tiny")
    cfg = build_config({"name": "toy-export", "output_dir": str(root / "outputs"),
                        "sampling": {"num_steps": 4, "guidance_scale": 3.0, "batch_size": 2},
                        "render": {"size": 32},
                        "rewards": {"app_config": str(REPO / "configs" / "rewards_toy.yaml")}})
    run_dir = root / "outputs" / "ray_results" / cfg.name
    checkpoint = write_checkpoint(cfg, run_dir, seed=0)
    out = root / "export"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    return {"root": root, "cfg": cfg, "run_dir": run_dir, "checkpoint": checkpoint, "out": out}


@pytest.fixture(scope="module")
def diffsplat(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_diffsplat")
    release, pixart = write_tiny_release(root / "release")
    model = prepare_diffsplat(release, pixart, root / "model", ["", *DIFFSPLAT_PROMPTS],  # "": CFG's negative
                              log=lambda message: None)
    cfg = build_config({"name": "diffsplat-export", "output_dir": str(root / "outputs"),
                        "model": {"kind": "diffsplat", "path": str(model), "dtype": "float32"},
                        "sampling": {"num_steps": 3, "guidance_scale": 3.0, "batch_size": 2},
                        "render": {"size": 32}, "algorithm": {"name": "nft"},
                        "rewards": {"terms": [{"name": "hps"}, {"name": "dnc", "weight": 0.5}],
                                    "app_config": str(REPO / "configs" / "rewards_diffsplat.yaml")}})
    run_dir = root / "outputs" / "ray_results" / cfg.name
    checkpoint = write_checkpoint(cfg, run_dir, seed=1)
    out = root / "export"
    export_run(checkpoint, out)
    return {"root": root, "cfg": cfg, "model": Path(model), "checkpoint": checkpoint, "out": out}


def samples(cfg, lora=None):
    """Splats of ``cfg``'s model (with ``lora``) for fixed prompts and seed: the same noise every time."""
    pipe = build_pipeline(cfg, lora, device="cpu")
    prompts = TINY_PROMPTS if cfg.model.kind == "tiny" else DIFFSPLAT_PROMPTS
    return pipe.splats(generate(pipe, prompts, seed=7, batch_size=2))


def assert_same_splats(actual, expected, atol):
    for name in ("means", "quats", "scales", "opacities", "colors"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=atol, rtol=1e-4, msg=name)


def max_difference(a, b) -> float:
    return max(float((getattr(a, n) - getattr(b, n)).abs().max()) for n in ("means", "scales", "opacities", "colors"))


@pytest.mark.parametrize("which", ["tiny", "diffsplat"])
def test_merged_model_samples_the_same_splats_as_base_plus_lora(which, tiny, diffsplat):
    case = {"tiny": tiny, "diffsplat": diffsplat}[which]
    cfg, out = case["cfg"], case["out"]
    with_lora = samples(cfg, case["checkpoint"])
    merged_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(out / "merged")})})
    merged = samples(merged_cfg)  # loaded as a base model: no LoRA anywhere
    # The LoRA matters (else this would compare the base model with itself) ...
    assert max_difference(samples(cfg), with_lora) > 1e-2
    # ... and merging it into the weights changes only float32 rounding: W x + B(A x) and (W + BA) x differ
    # by ~1e-6 in ε, which the sampler carries to at most 2.4e-4 in an opacity (the worst of 6 LoRA seeds).
    assert_same_splats(merged, with_lora, atol=1e-3)


@pytest.mark.parametrize("which", ["tiny", "diffsplat"])
def test_merged_directory_has_the_base_models_layout(which, tiny, diffsplat):
    case = {"tiny": tiny, "diffsplat": diffsplat}[which]
    base = TINY_PRIOR_DIR if which == "tiny" else case["model"]
    merged = case["out"] / "merged"
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(merged) == [f for f in files(base) if f != "README.md"]
    base_config = json.loads((base / "transformer" / "config.json").read_text())
    merged_config = json.loads((merged / "transformer" / "config.json").read_text())
    # diffusers records its version and where the weights were loaded from; the architecture is the base's
    bookkeeping = ("_diffusers_version", "_name_or_path")
    assert {k: v for k, v in merged_config.items() if k not in bookkeeping} == \
        {k: v for k, v in base_config.items() if k not in bookkeeping}
    weights = safetensors.torch.load_file(str(merged / "transformer" / "diffusion_pytorch_model.safetensors"))
    base_weights = safetensors.torch.load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert sorted(weights) == sorted(base_weights)  # plain weights: no lora_A/lora_B, no base_layer
    assert {v.dtype for v in weights.values()} == {v.dtype for v in base_weights.values()}
    assert any(not torch.equal(weights[k], base_weights[k]) for k in weights)  # the LoRA is in them
    other = "prompt_encoder" if which == "tiny" else "gsvae"
    assert (merged / other / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (base / other / "diffusion_pytorch_model.safetensors").read_bytes()


def test_peft_loads_the_peft_layout_and_it_matches_the_diffusers_one(tiny):
    out = tiny["out"]
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    by_peft = load_generator(tiny["cfg"], "cpu")
    PeftModel.from_pretrained(by_peft.denoiser, str(out / "peft"))
    by_diffusers = load_generator(tiny["cfg"], "cpu")
    load_lora(by_diffusers.denoiser, out / "lora")
    # Every LoRA weight arrived (peft warns, not fails, on keys that miss) ...
    peft_weights = {n.replace(".default.", "."): p for n, p in by_peft.denoiser.named_parameters() if "lora_" in n}
    diffusers_weights = adapter_parameters(by_diffusers.denoiser, "policy")
    assert peft_weights.keys() == diffusers_weights.keys()
    for key, value in diffusers_weights.items():
        torch.testing.assert_close(peft_weights[key], value, rtol=0, atol=0, msg=key)
    # ... and both models predict the same noise.
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 12, 32, 32)  # (B, V, C, h, w)
    embeds = by_peft.encode_prompts(TINY_PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(by_peft.predict(latents, 500, embeds), by_diffusers.predict(latents, 500, embeds))


def test_card_names_base_algorithm_rewards_and_training(tiny, diffsplat):
    card = (tiny["out"] / "README.md").read_text()
    assert str(TINY_PRIOR_DIR) in card and "the tiny splat prior" in card
    assert "Nabla-R2D3" in card and "`reward_scale`" in card
    assert "`color_match`, weight 1 (reward `color_match`" in card
    assert "3 trained epochs, 6 optimizer steps" in card and "abc123" in card
    assert "No evaluation of this LoRA was found" in card
    assert "name: toy-export" in card  # the config, also written beside it
    assert (tiny["out"] / "config.yaml").read_text() == tiny["cfg"].to_yaml()
    card = (diffsplat["out"] / "README.md").read_text()
    assert "DiffSplat" in card and str(diffsplat["model"]) in card and "DiffusionNFT" in card
    assert "`hps`, weight 1 (reward `hps`" in card and "`dnc`, weight 0.5" in card


def test_a_bare_lora_directory_exports_with_the_config_given(tiny, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(tiny["cfg"].to_yaml())
    result = export_run(tiny["out"] / "lora", tmp_path / "out", config=config)  # the export's own lora/: no state.json
    assert result.checkpoint is None
    assert "Exported from a bare LoRA directory" in result.card.read_text()
    assert (tmp_path / "out" / "peft" / "adapter_model.safetensors").read_bytes() == \
        (tiny["out"] / "peft" / "adapter_model.safetensors").read_bytes()


def test_card_carries_the_numbers_of_an_eval_report_that_lists_the_lora(tiny):
    from r2d3ray.eval.metrics import evaluate, parse_runs
    from r2d3ray.eval.report import write_report

    cfg = tiny["cfg"]
    evaluation = evaluate(cfg, parse_runs(f"base,trained={tiny['run_dir']}"), TINY_PROMPTS, [0], batch_size=2,
                          max_pictures=0)
    report = Path(cfg.output_dir) / "eval" / "first"
    write_report(evaluation, report)
    out = tiny["root"] / "export_with_eval"
    result = export_run(tiny["checkpoint"], out)  # finds the report by itself, under output_dir/eval
    assert [e.source for e in result.evaluations] == [report / "metrics.json"]
    card = (out / "README.md").read_text()
    reward = evaluation.summary["trained"]["reward"]
    assert "| metric | base | trained |" in card and "| reward | " in card
    assert f"{reward[0]:.4g} ± {reward[1]:.2g}" in card
    assert "No evaluation" not in card


def test_bad_input_is_a_user_error_that_says_what_to_pass(tiny, tmp_path, capsys):
    with pytest.raises(UserError, match="is not a directory"):
        export_run(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ExportError, match="no LoRA weights in .*checkpoint_\\*/lora/"):
        export_run(tmp_path / "empty_run", tmp_path / "out")
    with pytest.raises(ExportError, match="pass it with --config"):  # a bare LoRA: no state.json, no config
        export_run(tiny["out"] / "lora", tmp_path / "out")
    with pytest.raises(ExportError, match="already exists and is not an empty directory"):
        export_run(tiny["run_dir"], tiny["out"])
    with pytest.raises(ExportError, match="does not evaluate the exported LoRA"):
        bogus = tmp_path / "metrics.json"
        bogus.write_text(json.dumps({"runs": [{"label": "base", "lora": None}], "summary": {"base": {}}}))
        export_run(tiny["run_dir"], tmp_path / "out", reports=[bogus])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # The CLI prints one error line and exits 2.
    assert main(["export", "--run", str(tmp_path / "empty_run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --run: no LoRA weights in")
