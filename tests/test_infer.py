"""`r2d3ray infer` (and jobs/infer.py) on a tiny random-weight prior saved and loaded the real way."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from r2d3ray.config import ConfigError, load_config
from r2d3ray.eval.commands import register
from r2d3ray.infer import build_pipeline, generate, generate_batches
from r2d3ray.models.lora import add_lora_adapter, adapter_parameters, save_lora
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.splats import load_ply
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # render size of the test config
NUM_GAUSSIANS = 4 * 32 * 32  # V x latent resolution²



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny untrained prior, a run config for it, a prompt file and a training-checkpoint-like
    directory (lora/ with perturbed weights + state.json). Shared with tests/test_eval.py."""
    root = tmp_path_factory.mktemp("tiny_run")
    torch.manual_seed(0)
    TinySplatGenerator.from_config({"num_layers": 1}).save_pretrained(root / "prior")
    config = {
        "name": "tiny-test", "output_dir": str(root / "outputs"),
        "model": {"kind": "tiny", "path": str(root / "prior")},
        "sampling": {"num_steps": 4, "guidance_scale": 3.0, "batch_size": 2},
        "render": {"size": SIZE, "num_views": 4},
        "rewards": {"terms": [{"name": "color_match"}], "app_config": str(REPO / "configs" / "rewards_toy.yaml")},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "prompts.txt").write_text("a red cube\na small blue sphere\na tall green cylinder\n")

    # A LoRA far from zero, so that it visibly changes the samples.
    generator = TinySplatGenerator.from_pretrained(root / "prior")
    add_lora_adapter(generator.denoiser, "policy", rank=4)
    with torch.no_grad():
        for param in adapter_parameters(generator.denoiser, "policy").values():
            param.normal_(0.0, 0.5)
    checkpoint = root / "checkpoint_000002"
    save_lora(generator.denoiser, checkpoint / "lora", adapter="policy")
    (checkpoint / "state.json").write_text(json.dumps({"epoch": 2, "global_step": 2, "mlflow_run_id": None,
                                                       "config": config}))
    return root


def run_command(argv: list[str]) -> int:
    """The subcommands as the CLI registers them (r2d3ray.cli adds them through register())."""
    parser = argparse.ArgumentParser(prog="r2d3ray")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def infer_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["infer", "--config", str(root / "config.yaml"), "--prompts", str(root / "prompts.txt"),
            "--out", str(out), "--frames", "3", *extra]


def test_infer_base_writes_ply_png_gif_per_prompt_and_is_deterministic(tiny_run, tmp_path):
    assert run_command(infer_argv(tiny_run, tmp_path / "a", "--vis-normal")) == 0
    stems = ["0000_a_red_cube", "0001_a_small_blue_sphere", "0002_a_tall_green_cylinder"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        f"{s}{suffix}" for s in stems for suffix in (".ply", ".png", ".gif", "_normals.png"))
    for stem in stems:
        splats = load_ply(tmp_path / "a" / f"{stem}.ply")
        assert splats.means.shape == (1, NUM_GAUSSIANS, 3)
        with Image.open(tmp_path / "a" / f"{stem}.png") as grid:
            assert grid.size == (4 * SIZE + 5 * 2, SIZE + 2 * 2)  # 4 views in a row, 2-px padding
        with Image.open(tmp_path / "a" / f"{stem}.gif") as gif:
            assert gif.n_frames == 3 and gif.size == (SIZE, SIZE)
        normals = torch.from_numpy(np.asarray(Image.open(tmp_path / "a" / f"{stem}_normals.png")))
        assert normals.float().std() > 0  # a picture, not a blank

    # Same prompts, seed and batch size: the same noise, the same splats.
    assert run_command(infer_argv(tiny_run, tmp_path / "b", "--frames", "0")) == 0
    assert not list((tmp_path / "b").glob("*.gif"))
    for stem in stems:
        a, b = load_ply(tmp_path / "a" / f"{stem}.ply"), load_ply(tmp_path / "b" / f"{stem}.ply")
        assert torch.equal(a.means, b.means) and torch.equal(a.colors, b.colors)


def test_infer_with_a_lora_changes_the_samples(tiny_run, tmp_path):
    assert run_command(infer_argv(tiny_run, tmp_path / "base", "--frames", "0")) == 0
    # A checkpoint directory is accepted in place of its lora/ folder.
    argv = infer_argv(tiny_run, tmp_path / "lora", "--lora", str(tiny_run / "checkpoint_000002"), "--tag", "ft",
                      "--random-view", "--seed", "0")
    assert run_command(argv) == 0
    base = load_ply(tmp_path / "base" / "0000_a_red_cube.ply")
    tuned = load_ply(tmp_path / "lora" / "0000_a_red_cube_ft.ply")
    assert base.means.shape == tuned.means.shape
    assert not torch.allclose(base.means, tuned.means, atol=1e-3)
    assert (tmp_path / "lora" / "0000_a_red_cube_ft.gif").is_file()


def test_infer_errors_name_the_problem(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run_command(infer_argv(tiny_run, tmp_path, "--lora", str(tmp_path / "no_such_lora")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no LoRA weights in"):
        run_command(infer_argv(tiny_run, tmp_path, "--lora", str(tmp_path / "empty_dir")))
    (tmp_path / "empty.txt").write_text("\n")
    argv = infer_argv(tiny_run, tmp_path / "out")
    argv[argv.index("--prompts") + 1] = str(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="has no prompts"):
        run_command(argv)
    (tmp_path / "dragon.txt").write_text("a red cube\na red dragon\n")
    argv[argv.index("--prompts") + 1] = str(tmp_path / "dragon.txt")
    with pytest.raises(ValueError, match="unknown word 'dragon'"):
        run_command(argv)
    assert not (tmp_path / "out").exists()  # refused before anything was sampled or written
    with pytest.raises(ConfigError, match="infer options: invalid configuration:\n  tag = 'a/b'"):
        run_command(infer_argv(tiny_run, tmp_path / "out", "--tag", "a/b"))


def test_sample_is_infer_and_generate_draws_the_same_noise(tiny_run, tmp_path):
    # `r2d3ray sample` is the same command: the same defaults, noise and file names.
    assert run_command(infer_argv(tiny_run, tmp_path / "infer", "--frames", "0")) == 0
    assert run_command(["sample", *infer_argv(tiny_run, tmp_path / "sample", "--frames", "0")[1:]]) == 0
    names = sorted(p.name for p in (tmp_path / "infer").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "sample").iterdir()) and len(names) == 6
    for name in names:
        assert (tmp_path / "infer" / name).read_bytes() == (tmp_path / "sample" / name).read_bytes(), name
    assert run_command(["sample", "--config", str(tiny_run / "config.yaml"), "--prompt", "a red cube",
                        "--out", str(tmp_path / "one"), "--frames", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["0000_a_red_cube.ply", "0000_a_red_cube.png"]

    # generate (eval, eval-prior, the demo) samples batch k with infer's noise: the same splats.
    cfg = load_config(tiny_run / "config.yaml")
    pipe = build_pipeline(cfg)
    prompts = (tiny_run / "prompts.txt").read_text().split("\n")[:3]
    latents = generate(pipe, prompts, seed=0, batch_size=cfg.sampling.batch_size)  # (3, V, C, h, w)
    assert latents.shape == (3, *pipe.generator.latent_shape)
    splats = pipe.splats(latents)
    for i, name in enumerate(n for n in names if n.endswith(".ply")):
        torch.testing.assert_close(load_ply(tmp_path / "infer" / name).means, splats[i].means, rtol=0, atol=1e-6)
    # ... and so does generate_batches, one batch at a time.
    batches = list(generate_batches(pipe, prompts, seed=0, batch_size=2))
    assert [(start, chunk) for start, chunk, _ in batches] == [(0, prompts[:2]), (2, prompts[2:])]
    assert torch.equal(torch.cat([b for _, _, b in batches]), latents)
    with pytest.raises(ValueError, match="sampler='euler'"):
        generate(pipe, prompts, sampler="euler")


@pytest.mark.slow
def test_ray_job_writes_the_same_files_as_the_cli(tiny_run, tmp_path):
    import ray

    job = load_script("jobs/infer.py", "jobs_infer")

    assert run_command(infer_argv(tiny_run, tmp_path / "cli", "--frames", "2")) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        argv = infer_argv(tiny_run, tmp_path / "job", "--frames", "2")[1:] + ["--num-workers", "1"]
        assert job.main(argv) == 0
        assert job.main(argv[:3] + [str(tiny_run / "missing.txt")] + argv[4:]) == 2
    finally:
        ray.shutdown()
    cli_files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert cli_files == sorted(p.name for p in (tmp_path / "job").iterdir()) and len(cli_files) == 9
    for name in cli_files:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "job" / name).read_bytes(), name


def test_a_run_directory_resolves_to_its_newest_checkpoints_lora(tmp_path):
    from r2d3ray.infer import resolve_lora

    for stamp in ("2026-11-22_07-00-00.000001", "2026-11-22_07-05-00.000001"):
        (tmp_path / f"checkpoint_{stamp}" / "lora").mkdir(parents=True)
        (tmp_path / f"checkpoint_{stamp}" / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint_2026-11-22_07-09-00.000001").mkdir()  # being written: no LoRA yet
    assert resolve_lora(tmp_path) == tmp_path / "checkpoint_2026-11-22_07-05-00.000001" / "lora"
