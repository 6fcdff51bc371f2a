"""The `r2d3ray` entry point: help, config show, render, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import imageio.v3 as iio
import pytest
import torch
import yaml

from r2d3ray.cli import main
from r2d3ray.splats import Splats, save_ply


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("config", "render", "train", "serve", "demo", "sample", "infer", "eval",
                    "precompute-rewards", "pretrain", "eval-prior", "bench", "compare", "export"):
        assert command in out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "r2d3ray.cli", "config", "show", "--set", "training.lr=2e-4"],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out)["training"]["lr"] == pytest.approx(2e-4)


def test_config_show_error_is_one_line(capsys):
    assert main(["config", "show", "--config", "configs/toy.yaml", "--set", "training.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and "did you mean 'training.lr'" in err
    assert "Traceback" not in err


def test_render_writes_grid_and_turntable(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    n = 200
    splats = Splats(
        means=(torch.rand(1, n, 3, generator=g) - 0.5) * 0.6,
        quats=torch.nn.functional.normalize(torch.randn(1, n, 4, generator=g), dim=-1),
        scales=torch.full((1, n, 3), 0.03),
        opacities=torch.full((1, n), 0.9),
        colors=torch.rand(1, n, 3, generator=g),
    )
    save_ply(tmp_path / "blob.ply", splats)
    assert main(["render", "--ply", str(tmp_path / "blob.ply"), "--out", str(tmp_path / "out"),
                 "--views", "3", "--size", "32", "--turntable"]) == 0
    grid = iio.imread(tmp_path / "out" / "blob.png")
    assert grid.shape[0] >= 32 and grid.shape[1] >= 3 * 32
    assert grid.std() > 0  # something was drawn on the white background
    assert len(iio.imread(tmp_path / "out" / "blob.gif", index=None)) > 1


def test_malformed_ply_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nend_header\n")
    assert main(["render", "--ply", str(tmp_path / "bad.ply"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "binary_little_endian" in err
