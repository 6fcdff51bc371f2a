"""The DiffSplat path end to end, as a user runs it, on a tiny random-weight DiffSplat release.

The release is written in DiffSplat's real on-disk layout (the transformer_ema folder, the GS-VAE
accelerate checkpoint, PixArt-Σ's T5 tokenizer/encoder, VAE and scheduler folders) at toy sizes;
`r2d3ray prepare-diffsplat` turns it into the model directory and caches the prompts; then each of
the six shipped `configs/diffsplat_pas_*.yaml` trains for one epoch through `r2d3ray train`, with
only sizes, paths, devices and worker counts overridden. The rewards are the real HPSv2 and
aesthetic classes on tiny random-weight checkpoints and the weight-free DNC, served by Ray Serve.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import open_clip
import pytest
import ray
import torch
import yaml

from r2d3ray.cli import main
from r2d3ray.config import load_config
from r2d3ray.models.tiny_diffsplat import write_tiny_release

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = "diffsplat_test_rewards"
# ViT-H-14 / ViT-L-14 shaped but small (as tests/test_rewards_learned.py builds them).
TINY_HPS = dict(embed_dim=32, vision_cfg={"image_size": 28, "layers": 1, "width": 64, "patch_size": 14, "head_width": 32},
                text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1})
TINY_VIT_L = dict(embed_dim=768, vision_cfg={"image_size": 28, "layers": 1, "width": 64, "patch_size": 14},
                  text_cfg={"context_length": 77, "vocab_size": 100, "width": 64, "heads": 1, "layers": 1})
RUNS = ["hps", "aesthetic", "normal", "hps_nft", "aesthetic_nft", "normal_nft"]


def _reward_app(root: Path) -> Path:
    torch.manual_seed(0)
    hps = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_HPS)
    torch.save({"state_dict": {k: v.half() for k, v in hps.state_dict().items()}}, root / "HPS_v2.1_compressed.pt")
    clip = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, **TINY_VIT_L)
    torch.save({k: v.half() for k, v in clip.state_dict().items()}, root / "ViT-L-14.pt")
    # The shipped reward app with its checkpoint paths pointed at the tiny files and no GPUs.
    app = yaml.safe_load((ROOT / "configs" / "rewards_diffsplat.yaml").read_text())
    kwargs = {"hps": {"checkpoint": str(root / "HPS_v2.1_compressed.pt"), "version": "v2.1", "arch_overrides": TINY_HPS},
              "aesthetic": {"clip_checkpoint": str(root / "ViT-L-14.pt")}}
    app["deployments"] = [{**d, "kwargs": kwargs.get(d["name"], d.get("kwargs", {})), "num_gpus": 0, "num_cpus": 0}
                          for d in app["deployments"] if d["name"] in ("hps", "aesthetic", "dnc")]
    app["app_name"], app["http"] = APP, {"enabled": False}
    path = root / "rewards.yaml"
    path.write_text(yaml.safe_dump(app))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffsplat_train")
    diffsplat, pixart = write_tiny_release(root / "release")
    prompts = root / "prompts.txt"  # the first 24 shipped captions: the 83k set would take minutes to encode
    from r2d3ray.eval.prompts import read_prompts

    prompts.write_text("\n".join(read_prompts(ROOT / "r2d3ray/assets/prompts/g_objaverse_83k.parquet")[:24]) + "\n")
    model = root / "model"
    assert main(["prepare-diffsplat", "--diffsplat", str(diffsplat), "--pixart", str(pixart), "--out", str(model),
                 "--prompts", str(prompts)]) == 0
    app = _reward_app(root)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield {"root": root, "model": model, "prompts": prompts, "app": app}
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def overrides(ws, run: str, workers: int = 1) -> list[str]:
    """Sizes, paths, devices and worker counts: everything else is the shipped config's."""
    sets = [f"output_dir={ws['root'] / 'out'}", f"model.path={ws['model']}", f"prompts.file={ws['prompts']}",
            f"rewards.app_config={ws['app']}", f"rewards.app_name={APP}", "model.dtype=float32",
            "training.use_gpu=false", "training.precision=fp32", f"training.num_workers={workers}",
            "training.cpus_per_worker=1", "render.size=32", "sampling.num_steps=4", "training.epochs=1",
            "training.checkpoint_every=1"]
    return [arg for s in sets for arg in ("--set", s)]


def train(ws, run: str, *extra: str, workers: int = 1) -> dict:
    config = ROOT / "configs" / f"diffsplat_pas_{run}.yaml"
    assert main(["train", "--config", str(config), *overrides(ws, run, workers), *extra]) == 0
    cfg = load_config(config)
    checkpoints = sorted(p for p in (ws["root"] / "out" / "ray_results" / cfg.name).glob("checkpoint_*") if p.is_dir())
    return json.loads((checkpoints[-1] / "state.json").read_text())


def mlflow_run(ws, name: str):
    mlflow.set_tracking_uri(f"sqlite:///{ws['root'] / 'out' / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["r2d3ray"], filter_string=f"tags.mlflow.runName = '{name}'",
                                output_format="list")
    return run


def test_prepare_writes_the_model_directory(workspace):
    model = workspace["model"]
    for part in ("transformer/config.json", "gsvae/config.json", "scheduler/scheduler_config.json"):
        assert (model / part).is_file(), part
    assert list((model / "prompt_cache").glob("*.safetensors"))


def test_dry_run_passes_on_the_prepared_model(workspace, capsys):
    config = ROOT / "configs" / "diffsplat_pas_hps.yaml"
    assert main(["train", "--config", str(config), *overrides(workspace, "hps"), "--dry-run"]) == 0
    assert "nothing was trained" in capsys.readouterr().out


@pytest.mark.parametrize("run", RUNS)
def test_each_diffsplat_config_trains_one_epoch(workspace, run):
    workers = 2 if run == "hps_nft" else 1  # two ranks: NFT's reward statistics are gathered across them
    state = train(workspace, run, workers=workers)
    cfg = load_config(ROOT / "configs" / f"diffsplat_pas_{run}.yaml")
    assert state["global_step"] == cfg.optimizer_steps_per_epoch()  # the count its header states
    metrics = mlflow_run(workspace, cfg.name).data.metrics
    assert "loss" in metrics and any(k.startswith("reward/") for k in metrics)


def test_a_rerun_with_more_epochs_resumes(workspace):
    cfg = load_config(ROOT / "configs" / "diffsplat_pas_aesthetic.yaml")
    first = mlflow_run(workspace, cfg.name) if _has_run(workspace, cfg.name) else None
    if first is None:
        train(workspace, "aesthetic")
        first = mlflow_run(workspace, cfg.name)
    state = train(workspace, "aesthetic", "--set", "training.epochs=2")
    assert state["global_step"] == 2 * cfg.optimizer_steps_per_epoch()
    assert mlflow_run(workspace, cfg.name).info.run_id == first.info.run_id


def _has_run(ws, name: str) -> bool:
    mlflow.set_tracking_uri(f"sqlite:///{ws['root'] / 'out' / 'mlflow.db'}")
    return bool(mlflow.search_runs(experiment_names=["r2d3ray"], filter_string=f"tags.mlflow.runName = '{name}'",
                                   output_format="list"))
