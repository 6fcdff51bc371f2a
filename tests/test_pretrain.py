"""Pretraining the tiny prior, and the prior-quality metrics (on the committed checkpoint)."""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from r2d3ray.config import ConfigError, read_options
from r2d3ray.eval.prior import color_fidelity, evaluate_prior, object_colors
from r2d3ray.infer import generate
from r2d3ray.models.pretrain import CONFIG_NAME, PretrainConfig, pretrain
from r2d3ray.models.pipeline import SplatPipeline
from r2d3ray.models.tiny import TINY_SCHEDULER_CONFIG, TinySplatGenerator
from r2d3ray.models.world import COLORS, render_ground_truth
from r2d3ray.render.cameras import default_rig
from r2d3ray.render.rasterize import render_splats
from r2d3ray.splats import decode_splatter_images

REPO = Path(__file__).resolve().parents[1]
COMMITTED_PRIOR = REPO / "r2d3ray" / "assets" / "tiny_prior"
TINY_MODEL = dict(resolution=8, patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                  caption_channels=16)



def test_pretrain_writes_a_loadable_checkpoint_and_an_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = dict(steps=40, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1, ema_decay=0.9, model=TINY_MODEL)
    out = pretrain(config, tmp_path / "prior")

    generator = TinySplatGenerator.from_pretrained(out)
    assert generator.latent_shape == (4, 12, 8, 8)
    assert json.loads((out / CONFIG_NAME).read_text())["steps"] == 40
    # the model carries its noise schedule and x̂0 clipping to every sampler
    assert {k: generator.scheduler_config[k] for k in TINY_SCHEDULER_CONFIG} == TINY_SCHEDULER_CONFIG
    latents = torch.randn(2, *generator.latent_shape)
    raw = generator.predict(latents, torch.tensor([10, 900]), generator.encode_prompts(["a red cube", "a blue torus"]))
    assert raw.shape == latents.shape and torch.isfinite(raw).all()

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny_prior")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "40"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 40
    # ε-prediction starts near 1 (predicting nothing) and falls as soon as the net learns anything.
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_pretrain_config_refuses_bad_values(tmp_path):
    # Refused before any work, with the run configs' message: the key, what is wrong, the closest key.
    with pytest.raises(ConfigError, match="pretrain config: invalid configuration:\n  unknown key 'stepz'; did you mean 'steps'"):
        pretrain({"stepz": 3}, tmp_path / "prior")
    with pytest.raises(ConfigError, match="lr_schedule = 'cosin': Input should be 'linear', 'cosine'"):
        pretrain({"lr_schedule": "cosin"}, tmp_path / "prior")
    with pytest.raises(ConfigError, match=r"model = .*unknown keys \['layers'\]"):
        pretrain({"model": {"layers": 2}}, tmp_path / "prior")
    assert not (tmp_path / "prior").exists()
    with pytest.raises(ValueError, match="cfg_dropout"):
        PretrainConfig(cfg_dropout=1.5)
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        PretrainConfig(ema_decay=1.0)


def test_the_committed_pretrain_config_and_yaml_validate():
    saved = json.loads((COMMITTED_PRIOR / CONFIG_NAME).read_text())
    assert PretrainConfig.model_validate(saved).model_dump(mode="json") == saved
    options = read_options(REPO / "configs" / "tiny_prior.yaml", [], "pretrain config", "configs/tiny_prior.yaml")
    assert PretrainConfig.model_validate(options).model_dump(mode="json") == saved


def test_color_fidelity_on_ground_truth_splats_and_renders():
    rig = default_rig(4)
    prompts = ["a red cube", "a small blue sphere", "a tall yellow cone", "a black torus"]
    splats = decode_splatter_images(render_ground_truth(prompts, rig, 16), rig.c2w)
    expected = torch.tensor([COLORS[c] for c in ("red", "blue", "yellow", "black")])
    assert torch.allclose(object_colors(splats), expected, atol=1e-5)
    assert color_fidelity(splats, prompts).tolist() == [1.0, 1.0, 1.0, 1.0]
    wrong = ["a green cube", "a small blue sphere", "a tall orange cone", "a gray torus"]
    assert color_fidelity(splats, wrong).tolist() == [0.0, 1.0, 0.0, 0.0]

    renders = render_splats(splats, default_rig(4, size=32))  # over white: un-composited by alpha
    assert torch.allclose(object_colors(renders), expected, atol=0.03)
    assert color_fidelity(renders, prompts).tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="prompts"):
        color_fidelity(splats, prompts[:2])
    with pytest.raises(ValueError, match="unknown word"):
        color_fidelity(splats, ["a red cube", "a small blue sphere", "a tall yellow cone", "a plaid torus"])


def test_evaluate_prior_on_the_committed_checkpoint():
    generator = TinySplatGenerator.from_pretrained(COMMITTED_PRIOR)
    prompts = ["a red cube", "a large blue sphere"]
    result = evaluate_prior(generator, prompts, seeds=(0,), num_steps=8, guidance_scale=4.5, render_size=48)
    assert result["num_samples"] == 2 and len(result["samples"]) == 2
    assert 0.0 <= result["color_accuracy"] <= 1.0 and 0.0 <= result["silhouette_iou"] <= 1.0
    assert result["silhouette_iou_se"] >= 0.0
    # two easy, frequent training prompts: the committed prior draws something in about the right place
    assert result["silhouette_iou"] > 0.3
    again = evaluate_prior(generator, prompts, seeds=(0,), num_steps=8, guidance_scale=4.5, render_size=48)
    assert again["samples"] == result["samples"]  # deterministic given the seeds
    # Its samples are infer.generate's (the noise of `infer`, `eval` and the demo for this seed).
    latents = generate(SplatPipeline(generator, 8, eta=1.0, guidance_scale=4.5), prompts, seed=0, batch_size=64)
    colors = object_colors(generator.latents_to_splats(latents))
    assert [s["mean_color"] for s in result["samples"]] == [[round(float(c), 3) for c in row] for row in colors]
    with pytest.raises(ValueError, match="sampler"):
        evaluate_prior(generator, prompts, seeds=(0,), sampler="euler")

