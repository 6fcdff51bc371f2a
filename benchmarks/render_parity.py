"""Parity of the project's torch renderer with gsplat's CUDA rasteriser (needs a CUDA GPU).

    python benchmarks/render_parity.py [--out render_parity.json] [--seeds 3] [--conventions gsplat diffsplat]

For random object-like scenes (4 views, white background, render_mode "RGB+ED") both backends
run on the same CUDA tensors, in each Gaussian convention (r2d3ray/render/rasterize.py):
"gsplat" (normalised quaternions, 0.3 px² dilation; gsplat builds the covariances) and
"diffsplat" (raw quaternions, no dilation; gsplat gets precomputed ``covars`` and eps2d = 0). In
"diffsplat" the scene's quaternion channels are clamped to [-1, 1], like decoded DiffSplat ones,
so |q| varies from Gaussian to Gaussian. The script compares images, alphas, expected depth and the
gradients of a fixed random linear loss with respect to means, quats, scales, opacities and
colours. Errors are relative: ``max|a − b| / max(max|b|, tiny)`` with b = gsplat. Targets:
images/alphas ≤ 1e-3, gradients ≤ 1e-2. Prints a table, writes the numbers to JSON, and exits
with status 1 if a target is missed, 2 (with a message) when there is no CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for bench_render's scene
from bench_render import object_like_scene  # noqa: E402

IMAGE_TOLERANCE = 1e-3
GRADIENT_TOLERANCE = 1e-2
CASES = ((4096, 64), (16384, 128), (65536, 256))
PARAMETERS = ("means", "quats", "scales", "opacities", "colors")
CONVENTIONS = ("gsplat", "diffsplat")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def compare(num_gaussians: int, resolution: int, seed: int, gaussian_convention: str = "gsplat") -> dict:
    from r2d3ray.render import default_rig, rasterization

    cameras = default_rig(num_views=4, size=resolution).to("cuda")
    scene = list(object_like_scene(num_gaussians, seed=seed, device="cuda"))
    if gaussian_convention == "diffsplat":
        scene[1] = scene[1].clamp(-1.0, 1.0)  # decoded DiffSplat quaternion channels lie in [-1, 1]
    background = torch.ones(1, 4, 3, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    loss_weights = torch.rand(1, 4, resolution, resolution, 4, generator=g, device="cuda")
    alpha_weights = torch.rand(1, 4, resolution, resolution, 1, generator=g, device="cuda")

    results = {}
    for backend in ("gsplat", "torch"):
        inputs = [t.clone().requires_grad_() for t in scene]
        colors, alphas, _ = rasterization(*inputs, cameras.viewmats[None], cameras.Ks[None], resolution, resolution,
                                          backgrounds=background, render_mode="RGB+ED", backend=backend,
                                          gaussian_convention=gaussian_convention)
        ((colors * loss_weights).sum() + (alphas * alpha_weights).sum()).backward()
        results[backend] = (colors.detach(), alphas.detach(), [t.grad for t in inputs])
    (ref_colors, ref_alphas, ref_grads), (colors, alphas, grads) = results["gsplat"], results["torch"]
    row = {
        "convention": gaussian_convention, "num_gaussians": num_gaussians, "resolution": resolution, "seed": seed,
        "images": relative_error(colors[..., :3], ref_colors[..., :3]),
        "alphas": relative_error(alphas, ref_alphas),
        "depth": relative_error(colors[..., 3:] * alphas, ref_colors[..., 3:] * ref_alphas),  # Σwz: no 0/0 noise
        **{f"grad_{name}": relative_error(ours, ref) for name, ours, ref in zip(PARAMETERS, grads, ref_grads)},
    }
    row["ok"] = (max(row["images"], row["alphas"]) <= IMAGE_TOLERANCE
                 and max(row[f"grad_{name}"] for name in PARAMETERS) <= GRADIENT_TOLERANCE)
    return row


def run(seeds: int = 3, conventions=CONVENTIONS, cases=CASES, out: str | None = None) -> list[dict]:
    """Every (convention, case, seed); prints the table, writes ``out`` (JSON) when given."""
    rows = [compare(n, res, seed, convention) for convention in conventions for n, res in cases for seed in range(seeds)]
    columns = ["images", "alphas", "depth", *(f"grad_{name}" for name in PARAMETERS)]
    print(f"{'convention':>10} {'gaussians':>9} {'res':>4} {'seed':>4} " + " ".join(f"{c:>13}" for c in columns) + "   ok")
    for row in rows:
        print(f"{row['convention']:>10} {row['num_gaussians']:>9} {row['resolution']:>4} {row['seed']:>4} "
              + " ".join(f"{row[c]:>13.2e}" for c in columns) + f"   {row['ok']}")
    if out:
        with open(out, "w") as f:
            json.dump({"image_tolerance": IMAGE_TOLERANCE, "gradient_tolerance": GRADIENT_TOLERANCE,
                       "device": torch.cuda.get_device_name(), "cases": rows}, f, indent=2)
        print(f"wrote {out}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="render_parity.json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--conventions", nargs="+", choices=CONVENTIONS, default=list(CONVENTIONS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("render_parity: no CUDA device here; gsplat's rasteriser needs one. Run this on a GPU machine.")
        return 2
    rows = run(args.seeds, args.conventions, out=args.out)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
