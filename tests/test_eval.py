"""`r2d3ray eval` / `precompute-rewards` on the tiny prior against a LoRA, and the metric estimators."""

import json
import math

import mlflow
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from test_infer import run_command, tiny_run  # noqa: F401  (shared fixtures)

from r2d3ray.eval.metrics import ClipScorer, diversity, kid, mean_se, parse_runs
from r2d3ray.eval.prompts import filter_by_reward


def test_kid_is_zero_mean_for_one_distribution_and_its_jackknife_is_leave_one_out():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    same, same_se = kid(x, y)
    shifted, shifted_se = kid(x, y + 1.0)
    assert abs(same) < 3 * same_se  # unbiased: an estimate of 0
    assert shifted > 3 * shifted_se > 0
    # The jackknife from kernel row sums equals re-estimating with each pair left out.
    loo = torch.tensor([kid(torch.cat([x[:i], x[i + 1:]]), torch.cat([y[:i], y[i + 1:]]))[0] for i in range(40)])
    assert math.isclose(same_se, math.sqrt(39 / 40 * ((loo - loo.mean()) ** 2).sum()), rel_tol=1e-6)
    assert math.isnan(kid(x[:3], y[:3])[1]) and math.isnan(kid(x[:1], y[:1])[0])
    with pytest.raises(ValueError, match="two \\(n, d\\) feature sets"):
        kid(x, y[:5])


def test_diversity_and_standard_error():
    # Three points at pairwise distances 5, 5, 6 (√d = 2 with d = 4 after padding).
    points = torch.tensor([[0.0, 0, 0, 0], [3, 4, 0, 0], [6, 0, 0, 0]])
    assert math.isclose(diversity(points), (5 + 6 + 5) / 3 / 2)
    assert math.isnan(diversity(points[:1]))
    mean, se = mean_se([1.0, 2.0, 3.0, float("nan")])
    assert (mean, se) == (2.0, pytest.approx(1 / math.sqrt(3)))


def test_paired_differences_subtract_the_base_models_sample_of_the_same_prompt_and_seed():
    from r2d3ray.eval.stats import paired_differences

    samples = [{"run": run, "prompt": p, "seed": seed, "reward": value}
               for run, values in (("base", [1.0, 2.0, 3.0, 4.0]), ("tuned", [1.5, 2.0, 3.5, 3.0]))
               for (p, seed), value in zip([("a", 0), ("a", 1), ("b", 0), ("b", 1)], values)]
    samples = samples[4:] + samples[:4]  # the order of the list does not pair them
    torch.testing.assert_close(paired_differences(samples, "tuned", "reward"),
                               torch.tensor([0.5, 0.0, 0.5, -1.0], dtype=torch.float64))


def test_parse_runs(tiny_run, tmp_path):
    runs = parse_runs(f"{tiny_run / 'checkpoint_000002'},mine={tiny_run / 'checkpoint_000002' / 'lora'}")
    assert [r.label for r in runs] == ["base", "tiny-test@2", "mine"]
    assert runs[0].lora is None and runs[1].lora == runs[2].lora == tiny_run / "checkpoint_000002" / "lora"
    assert runs[2].checkpoint == tiny_run / "checkpoint_000002" and runs[2].run_name == "tiny-test"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        parse_runs(f"base,{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="labels \\['a'\\] repeat"):
        parse_runs(f"a={tiny_run / 'checkpoint_000002'},a={tiny_run / 'checkpoint_000002'}")
    with pytest.raises(ValueError, match="--runs is empty"):
        parse_runs(" , ")


def test_eval_against_a_lora_writes_the_table_report_and_mlflow_run(tiny_run, tmp_path):
    # A training run in the config's MLflow store, linked from the checkpoint's state.json.
    uri = f"sqlite:///{tiny_run / 'outputs' / 'mlflow.db'}"
    (tiny_run / "outputs").mkdir(exist_ok=True)
    client = mlflow.tracking.MlflowClient(uri)
    training = client.create_run(client.create_experiment("r2d3ray"), run_name="tiny-test")
    for step, value in enumerate([0.2, 0.3, 0.45]):
        for key in ("reward/mean", "reward/color_match", "global_step"):
            client.log_metric(training.info.run_id, key, step if key == "global_step" else value, step=step)
    client.set_terminated(training.info.run_id)
    checkpoint = tiny_run / "checkpoint_000002"
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "mlflow_run_id": training.info.run_id}))

    (tmp_path / "held_out.txt").write_text("a red cube\na blue sphere\n")
    out = tmp_path / "report"
    config = ["--config", str(tiny_run / "config.yaml"), "--prompts", str(tmp_path / "held_out.txt")]
    assert run_command(["eval", *config, "--runs", f"base,{checkpoint}", "--seeds", "2", "--out", str(out),
                        "--name", "eval-test"]) == 0

    for name in ["index.html", "summary.md", "metrics.json", "samples.parquet", "figures/metrics.png",
                 "figures/curves.png", "figures/grid_000.png", "figures/grid_001.png"]:
        assert (out / name).is_file(), name
    report = json.loads((out / "metrics.json").read_text())
    base, tuned = report["summary"]["base"], report["summary"]["tiny-test@2"]
    for metrics in (base, tuned):
        for key in ["reward", "reward/color_match", "color_accuracy", "silhouette_iou", "dnc", "diversity"]:
            assert math.isfinite(metrics[key]["mean"]) and math.isfinite(metrics[key]["se"]), key
    assert "prior_kid" not in base and tuned["prior_kid"]["mean"] > 0  # the perturbed LoRA moved away
    assert report["runs"][1]["mlflow_run_id"] == training.info.run_id and report["runs"][1]["training_steps"] == 2

    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(samples) == 2 * 2 * 2  # runs x prompts x seeds
    # The summary is the mean of the per-sample values.
    base_rewards = [s["reward"] for s in samples if s["run"] == "base"]
    assert math.isclose(base["reward"]["mean"], sum(base_rewards) / 4, rel_tol=1e-9)
    # One term with weight 1, mean over views: the objective equals its component.
    assert all(math.isclose(s["reward"], s["reward/color_match"], rel_tol=1e-5) for s in samples)

    html = (out / "index.html").read_text()
    assert "tiny-test@2" in html and "figures/curves.png" in html and "a blue sphere" in html
    # The 3D viewers: the script and one data file per prompt shown (its base and fine-tuned objects).
    assert (out / "viewer" / "splat-viewer.js").is_file() and len(list((out / "viewer").glob("splats_*.js"))) == 2
    assert html.count("<canvas") == 4  # 2 prompts x 2 runs
    summary = (out / "summary.md").read_text()
    assert "| base |" in summary and "| tiny-test@2 |" in summary and "2 steps" in summary  # from state.json

    evaluation = client.search_runs([training.info.experiment_id], "tags.mlflow.runName = 'eval-test'")[0]
    assert evaluation.data.tags["eval.run1.mlflow_run_id"] == training.info.run_id
    assert evaluation.data.tags["eval.run0.lora"] == "base model"
    assert math.isclose(evaluation.data.metrics["tiny-test_2/reward"], tuned["reward"]["mean"], rel_tol=1e-6)
    assert "summary.md" in {a.path.split("/")[-1] for a in client.list_artifacts(evaluation.info.run_id, "report")}

    # precompute-rewards scores the base model with the same noise and views: the same rewards.
    cache = tmp_path / "rewards.parquet"
    assert run_command(["precompute-rewards", *config, "--out", str(cache), "--seeds", "2"]) == 0
    rows = pq.read_table(cache).to_pylist()
    assert len(rows) == 2 * 2 and {r["reward_name"] for r in rows} == {"color_match"}
    by_sample = {(s["prompt"], s["seed"]): s["reward/color_match"] for s in samples if s["run"] == "base"}
    for row in rows:
        assert math.isclose(row["reward"], by_sample[(row["prompt"], row["seed"])], rel_tol=1e-5)
    means = {p: sum(r["reward"] for r in rows if r["prompt"] == p) / 2 for p in ["a red cube", "a blue sphere"]}
    best = max(means, key=means.get)
    assert filter_by_reward(["a red cube", "a blue sphere"], cache, min(means.values())) == [best]


def test_eval_and_precompute_errors(tiny_run, tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\n")
    config = ["--config", str(tiny_run / "config.yaml"), "--prompts", str(tmp_path / "p.txt")]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run_command(["eval", *config, "--runs", f"base,{tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="--seeds 0"):
        run_command(["eval", *config, "--runs", "base", "--seeds", "0"])
    with pytest.raises(ValueError, match="use a .parquet name"):
        run_command(["precompute-rewards", *config, "--out", str(tmp_path / "r.csv")])
    (tmp_path / "odd.txt").write_text("a purple spaceship\n")
    config[-1] = str(tmp_path / "odd.txt")
    with pytest.raises(ValueError, match="unknown word 'spaceship'"):
        run_command(["precompute-rewards", *config, "--out", str(tmp_path / "r.parquet")])
    config[-1] = str(tmp_path / "p.txt")
    with pytest.raises(ValueError, match=r"rewards.terms name \['hps'\], which the reward app .* does not define"):
        run_command(["precompute-rewards", *config, "--set", "rewards.terms=[{name: hps}]",
                     "--out", str(tmp_path / "r.parquet")])
    assert not (tmp_path / "r.parquet").exists()


def test_clip_scorer_loads_an_openai_checkpoint_and_scores_images(tmp_path):
    # ViT-L-14 shaped but tiny, with the real BPE vocabulary so the real tokenizer's ids fit.
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, embed_dim=32,
                                   vision_cfg={"image_size": 28, "layers": 1, "width": 64, "patch_size": 14},
                                   text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                                             "layers": 1})
    torch.save(model.state_dict(), tmp_path / "ViT-L-14.pt")
    clip = ClipScorer(tmp_path / "ViT-L-14.pt")
    images = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    embeddings = clip.image_embeddings(images)
    assert embeddings.shape == (2, 3, 32) and torch.allclose(embeddings.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    scores = clip.clip_score(embeddings, ["a red cube", "a blue sphere"])
    text = model.eval().encode_text(open_clip.tokenize(["a red cube", "a blue sphere"]), normalize=True)
    expected = (100 * torch.einsum("bvd,bd->bv", embeddings, text).clamp(min=0)).mean(1)
    assert scores.shape == (2,) and torch.allclose(scores, expected, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ClipScorer(tmp_path / "missing.pt")
