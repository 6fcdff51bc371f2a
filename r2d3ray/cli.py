"""The `r2d3ray` command line: one entry point, one subcommand per job.

Subcommands import their heavy dependencies (torch, Ray, MLflow) lazily, so `r2d3ray --help` and
`r2d3ray config show` answer at once. A problem the user can fix (a bad config key, a missing file,
a malformed PLY) is printed as one line prefixed with `error:` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True,
                     what: str = "YAML run config, e.g. configs/toy.yaml") -> None:
    parser.add_argument("--config", required=required, metavar="FILE", help=what)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set training.lr=1e-4 (repeatable)",
    )


def cmd_config_show(args: argparse.Namespace) -> int:
    from r2d3ray.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from r2d3ray.render.cameras import orbit_cameras
    from r2d3ray.render.pictures import save_grid_png, save_turntable_gif
    from r2d3ray.render.rasterize import render_splats
    from r2d3ray.splats import load_ply

    splats = load_ply(args.ply)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    azimuths = [360.0 * i / args.views for i in range(args.views)]
    cameras = orbit_cameras(azimuths, [args.elevation] * args.views, radius=args.radius, width=args.size, height=args.size)
    rendered = render_splats(splats, cameras)
    stem = Path(args.ply).stem
    grid = out / f"{stem}.png"
    save_grid_png(rendered.images, grid)
    print(f"wrote {grid} ({splats.num_gaussians} Gaussians, {args.views} views at {args.size}x{args.size})")
    if args.turntable:
        gif = out / f"{stem}.gif"
        save_turntable_gif(splats, gif, size=args.size, elevation_deg=args.elevation, radius=args.radius)
        print(f"wrote {gif}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from r2d3ray.config import load_config
    from r2d3ray.train.launch import launch

    cfg = load_config(args.config, args.overrides)
    result = launch(cfg, address=args.address, dry_run=args.dry_run)
    if result is not None:
        print(f"finished {cfg.name!r}; latest checkpoint: {result.checkpoint.path if result.checkpoint else 'none'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from r2d3ray.demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from r2d3ray.serve.launch import serve_main

    return serve_main(args.config, args.overrides, args.address)


def cmd_sample(args: argparse.Namespace) -> int:
    from r2d3ray.config import load_config
    from r2d3ray.infer import build_pipeline, generate, read_prompt_file, write_outputs

    cfg = load_config(args.config, args.overrides)
    prompts = read_prompt_file(args.prompts) if args.prompts else [args.prompt]
    pipe = build_pipeline(cfg, args.lora)
    latents = generate(pipe, prompts, seed=args.seed)
    for path in write_outputs(pipe, prompts, latents, args.out, size=args.size):
        print(f"wrote {path}")
    return 0


def cmd_bench_render(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_render import main as bench_render_main

    return bench_render_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2d3ray",
        description="Align 3D-native diffusion models (Gaussian splats) with 2D rewards on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect run configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config (file + overrides + defaults) as YAML")
    _add_config_args(show, required=False)
    show.set_defaults(func=cmd_config_show)

    render = sub.add_parser("render", help="render a standard 3DGS PLY file to a multi-view grid PNG (and a GIF)")
    render.add_argument("--ply", required=True, metavar="FILE", help="binary 3D Gaussian Splatting PLY")
    render.add_argument("--out", required=True, metavar="DIR", help="output directory")
    render.add_argument("--views", type=int, default=4, help="number of orbit views (default 4)")
    render.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    render.add_argument("--elevation", type=float, default=10.0, help="camera elevation in degrees (default 10)")
    render.add_argument("--radius", type=float, default=1.4, help="orbit radius (default 1.4, DiffSplat's normalised objects)")
    render.add_argument("--turntable", action="store_true", help="also write a turntable GIF")
    render.set_defaults(func=cmd_render)

    train = sub.add_parser("train", help="align a generator with rewards (Ray Train + DeepSpeed, Serve rewards, MLflow)")
    _add_config_args(train)
    train.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    train.add_argument("--dry-run", action="store_true", help="check config, files, resources and reward endpoints; train nothing")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="the embedded default end to end: align the tiny prior, then compare before/after")
    _add_config_args(demo, required=False)
    demo.set_defaults(func=cmd_demo, config="configs/toy.yaml")

    serve = sub.add_parser("serve", help="deploy the reward plane (a Ray Serve app) and leave it running for other jobs")
    _add_config_args(serve, what="YAML reward app config, e.g. configs/rewards_toy.yaml")
    serve.add_argument("--address", default="auto",
                       help="'auto': a running cluster (deploy and return; the app stays up), "
                            "'local': a cluster in this process (blocks until Ctrl-C), or a Ray address")
    serve.set_defaults(func=cmd_serve)

    sample = sub.add_parser("sample", help="generate splats for prompts: a PLY and a multi-view grid PNG per prompt")
    _add_config_args(sample)
    which = sample.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help='one prompt, e.g. "a red cube"')
    which.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")
    sample.add_argument("--out", required=True, metavar="DIR", help="output directory")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sample.add_argument("--lora", metavar="DIR", help="a LoRA directory (a checkpoint's lora/); default: the base model")
    sample.add_argument("--size", type=int, default=256, help="grid view size in pixels (default 256)")
    sample.set_defaults(func=cmd_sample)

    from r2d3ray.eval.commands import register as register_eval_commands  # imports _add_config_args from here

    register_eval_commands(sub)

    bench = sub.add_parser("bench", help="run a benchmark; prints a table and writes JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    bench_render = bench_sub.add_parser(
        "render", help="renderer forward+backward time and peak memory vs Gaussians and resolution",
        description="Arguments after `render` go to benchmarks/bench_render.py (see its --help).",
    )
    bench_render.add_argument("bench_args", nargs=argparse.REMAINDER, help="e.g. --quick --device cpu")
    bench_render.set_defaults(func=cmd_bench_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is cmd_render and (args.views < 1 or args.size < 8):
        print("error: --views must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        # Config errors, bad shapes and malformed files carry a message written for the user.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
