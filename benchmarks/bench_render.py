"""Renderer speed and memory: forward + backward time and peak memory against the number of
Gaussians and the resolution (4 views per object, like DiffSplat's rig).

    python benchmarks/bench_render.py [--quick] [--device cpu|cuda] [--backend auto|torch|gsplat] [--out FILE.json]

Each case runs in its own subprocess so that peak memory is that case's alone:
* CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set) after the case minus
  the same value just before it (after imports and scene creation), i.e. the extra memory the
  render + backward needed at its peak.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
Time is the wall time of one forward + backward after one untimed warm-up run (the first run
also pays one-time costs) — except cases slower than 20 s, timed once. ``cpu_seconds`` (process
CPU time) is recorded too: on a shared, overloaded machine it is the steadier number, measured
best with ``OMP_NUM_THREADS=1`` (idle OpenMP threads spin and count as CPU time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

FULL_SIZES = (4096, 16384, 65536, 262144)
FULL_RESOLUTIONS = (64, 128, 256)
QUICK_SIZES = (4096, 16384, 65536)
QUICK_RESOLUTIONS = (64, 128)


def object_like_scene(num_gaussians: int, seed: int = 0, device="cpu"):
    """Gaussians on a noisy sphere shell of radius 0.4 around the origin, with DiffSplat's scale
    range (5e-4..2e-2, log-uniform) and random rotations, opacities in [0.2, 1], colours in [0, 1].
    Returns (means, quats, scales, opacities, colors) with a batch dim of 1, float32."""
    g = torch.Generator().manual_seed(seed)
    N = num_gaussians
    means = torch.nn.functional.normalize(torch.randn(1, N, 3, generator=g), dim=-1) * 0.4
    means = means + 0.02 * torch.randn(1, N, 3, generator=g)
    quats = torch.randn(1, N, 4, generator=g)
    scales = torch.exp(torch.empty(1, N, 3).uniform_(math.log(5e-4), math.log(2e-2), generator=g))
    opacities = torch.empty(1, N).uniform_(0.2, 1.0, generator=g)
    colors = torch.rand(1, N, 3, generator=g)
    return tuple(t.to(device) for t in (means, quats, scales, opacities, colors))


def run_case(num_gaussians: int, resolution: int, device: str = "cpu", backend: str = "auto",
             num_views: int = 4) -> dict:
    """One forward + backward of 4 views; returns seconds and peak MiB (see the module docstring)."""
    from r2d3ray.render import default_rig, rasterization

    cameras = default_rig(num_views=num_views, size=resolution).to(device)
    scene = object_like_scene(num_gaussians, device=device)
    background = torch.ones(1, num_views, 3, device=device)

    def forward_backward():
        inputs = [t.clone().requires_grad_() for t in scene]
        colors, alphas, meta = rasterization(*inputs, cameras.viewmats[None], cameras.Ks[None], resolution,
                                             resolution, backgrounds=background, backend=backend)
        (colors.sum() + alphas.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return meta, float(alphas.mean())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    start, cpu_start = time.perf_counter(), time.process_time()
    meta, coverage = forward_backward()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    cpu_seconds = time.process_time() - cpu_start
    if seconds < 20:  # time again without first-call costs
        start, cpu_start = time.perf_counter(), time.process_time()
        forward_backward()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "num_gaussians": num_gaussians, "resolution": resolution, "views": num_views, "device": device,
        "backend": meta.get("backend", "gsplat"),  # gsplat's meta has no "backend" key
        "seconds_fwd_bwd": round(seconds, 4), "cpu_seconds": round(cpu_seconds, 4), "peak_mib": round(peak / 2**20, 1),
        "chunks": meta.get("num_chunks"), "mean_alpha": round(coverage, 4),
        "threads": torch.get_num_threads(),
    }


def run(device: str = "cpu", sizes=None, resolutions=None, out_json: str | None = None,
        backend: str = "auto", num_views: int = 4, quick: bool = False) -> list[dict]:
    """Run every (size, resolution) case in a fresh subprocess; print a table; write JSON.

    ``sizes``/``resolutions`` default to the full grid (4k..262k Gaussians, 64..256 px) or, with
    ``quick``, to a CPU-friendly subset (about two minutes on 2 cores)."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    resolutions = resolutions or (QUICK_RESOLUTIONS if quick else FULL_RESOLUTIONS)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_render: --device cuda asked for, but no CUDA device is available")
    rows = []
    print(f"{'gaussians':>10} {'res':>5} {'views':>5} {'backend':>8} {'fwd+bwd s':>10} {'cpu s':>7} {'peak MiB':>9} {'chunks':>6}")
    for size in sizes:
        for resolution in resolutions:
            case = json.dumps(dict(num_gaussians=size, resolution=resolution, device=device, backend=backend,
                                   num_views=num_views))
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _repo_path()})
            if proc.returncode != 0:
                raise RuntimeError(f"bench_render case {case} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{size:>10} {resolution:>5} {num_views:>5} {row['backend']:>8} {row['seconds_fwd_bwd']:>10.3f} {row['cpu_seconds']:>7.2f} "
                  f"{row['peak_mib']:>9.1f} {str(row['chunks']):>6}", flush=True)
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump({"device": device, "backend": backend, "cases": rows}, f, indent=2)
        print(f"wrote {out_json}")
    return rows


def _repo_path() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, resolutions {QUICK_RESOLUTIONS}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "gsplat"))
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="*", help="numbers of Gaussians (overrides the defaults)")
    parser.add_argument("--resolutions", type=int, nargs="*", help="image sizes (overrides the defaults)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    run(args.device, args.sizes, args.resolutions, args.out, args.backend, args.views, quick=args.quick)


if __name__ == "__main__":
    main()
