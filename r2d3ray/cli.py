"""The `r2d3ray` command line: one entry point, one subcommand per job.

Subcommands import their heavy dependencies (torch, Ray, MLflow) lazily, so `r2d3ray --help` and
`r2d3ray config show` answer at once. A problem the user can fix (a bad config key, a missing file,
a malformed PLY) is printed as one line prefixed with `error:` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r2d3ray.cli_args import add_config_args
from r2d3ray.errors import UserError


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
    result = launch(cfg, address=args.address, dry_run=args.dry_run, config_file=args.config)
    if result is not None:
        print(f"finished {cfg.name!r}; latest checkpoint: {result.checkpoint.path if result.checkpoint else 'none'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from r2d3ray.demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from r2d3ray.compare import run_compare

    run_compare(args.config, args.overrides, args.methods, args.seeds, args.epochs, args.out, args.experiment)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from r2d3ray.config import read_options
    from r2d3ray.models.pretrain import pretrain

    options = read_options(args.config, args.overrides, "pretrain config", "configs/tiny_prior.yaml")
    out = pretrain(options, args.out)
    print(f"wrote the tiny prior to {out}; check it with `r2d3ray eval-prior --model {out}`")
    return 0


def cmd_train_critic(args: argparse.Namespace) -> int:
    from r2d3ray.config import read_options
    from r2d3ray.eval.critic import format_report
    from r2d3ray.rewards.critic_train import train_critic

    options = read_options(args.config, args.overrides, "critic config", "configs/tiny_critic.yaml")
    record = train_critic(options, args.out)
    print(format_report({"pairwise": record["held_out"]}))
    print(f"wrote the critic to {args.out} in {record['wall_time_s']:.0f} s; use it with "
          f"`reward: tiny_critic` and `kwargs: {{checkpoint: {args.out}}}`, and measure its headroom over the "
          f"tiny prior with `python -m r2d3ray.eval.critic --model {args.out}`")
    return 0


def cmd_eval_prior(args: argparse.Namespace) -> int:
    import json

    from r2d3ray.eval.prior import GUIDANCE_SCALE, evaluate_prior
    from r2d3ray.models.tiny import TinySplatGenerator
    from r2d3ray.models.loading import TINY_PRIOR_DIR

    generator = TinySplatGenerator.from_pretrained(args.model or TINY_PRIOR_DIR)
    result = evaluate_prior(generator, seeds=tuple(range(args.seeds)), num_steps=args.steps,
                            guidance_scale=GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale)
    print(f"{'held-out prompts x seeds':<28}{result['num_samples']}")
    print(f"{'colour accuracy':<28}{result['color_accuracy']:.1%} ± {result['color_accuracy_se']:.1%}")
    print(f"{'silhouette IoU':<28}{result['silhouette_iou']:.3f} ± {result['silhouette_iou_se']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        print(f"wrote {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from r2d3ray.serve.launch import serve_main

    return serve_main(args.config, args.overrides, args.address)


def cmd_prepare_diffsplat(args: argparse.Namespace) -> int:
    from r2d3ray.models.prepare import prepare_diffsplat, prompts_to_cache

    prompt_files, eval_prompts, out = list(args.prompts), [], args.out
    if args.config:
        from r2d3ray.config import load_config

        cfg = load_config(args.config, args.overrides)
        if cfg.model.kind != "diffsplat":
            raise ValueError(f"--config {args.config}: model.kind is {cfg.model.kind!r}; prepare-diffsplat needs a "
                             "DiffSplat run config such as configs/diffsplat_pas_hps.yaml")
        prompt_files += [cfg.prompts.file] if cfg.prompts.file else []
        eval_prompts, out = cfg.tracking.eval_prompts, out or cfg.model.path
    if not out:
        raise ValueError("--out is required (or --config with a model.path): the model directory to write")
    out = prepare_diffsplat(args.diffsplat, args.pixart, out, prompts_to_cache(prompt_files, eval_prompts),
                            reference_cache=args.reference_cache, batch_size=args.batch_size,
                            address=args.address, num_encoders=args.num_encoders)  # fmt: skip
    print(f"wrote {out}; load it with model.kind: diffsplat, model.path: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from r2d3ray.export import export_run

    result = export_run(args.run, args.out, args.config, args.overrides, args.eval)
    print(f"exported {result.lora} to {result.out}: lora/ (diffusers), peft/ (peft), merged/ (the base model with "
          f"the LoRA merged), config.yaml; model card {result.card} "
          f"({len(result.evaluations) or 'no'} evaluation report{'' if len(result.evaluations) == 1 else 's'})")
    return 0


BENCHMARKS = {
    "render": "renderer forward+backward time and peak memory vs Gaussians and resolution",
    "rewards": "reward latency/throughput in-process vs Serve handle vs HTTP, with gradients",
    "pipeline": "training steps/s and the sample / reward-wait / train split, rewards served vs in-process",
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks live in benchmarks/ (a repository checkout); each has main(argv) -> exit code."""
    args.bench_args = [a for a in args.bench_args if a != "--"]
    import importlib

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (folder / f"bench_{args.bench_command}.py").is_file():
        raise FileNotFoundError(f"benchmark scripts not found in {folder}; run r2d3ray bench from a checkout of the repository")
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"bench_{args.bench_command}").main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2d3ray",
        description="Align 3D-native diffusion models (Gaussian splats) with 2D rewards on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect run configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config (file + overrides + defaults) as YAML")
    add_config_args(show, required=False)
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
    add_config_args(train)
    train.add_argument("--address", default=None,
                       help="the Ray cluster, as everywhere in r2d3ray: 'auto' (a running one), 'local' (a new one "
                            "in this process) or an address such as ray://head:10001; default: RAY_ADDRESS, else 'local'")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, the model's files, the prompts (and DiffSplat's prompt cache), "
                            "the reward app, the storage and the cluster's resources; train nothing")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="the embedded default end to end: align the tiny prior, then compare before/after")
    add_config_args(demo, required=False)
    demo.set_defaults(func=cmd_demo, config="configs/toy_critic.yaml")

    compare = sub.add_parser(
        "compare", help="train every algorithm on one budget, several seeds, one MLflow experiment; report side by side",
        description="For each method x seed, train a run that differs from the base config only in algorithm.name and "
                    "training.seed (the same trajectories per epoch, epochs and optimizer steps), one after another, "
                    "as runs compare-<method>-seed<k>-<date> of the MLflow experiment compare-<date>; then evaluate "
                    "the base model and each run's checkpoints on the held-out prompts with the same seeds and write "
                    "<out>/compare.md (the table), compare_summary.json, compare_curves.png, before_after.png and "
                    "report/. A re-run with the same --out skips the finished runs. See r2d3ray/compare.py.",
    )
    add_config_args(compare, required=False,
                    what="the base run config (default: configs/toy_critic.yaml, the embedded default aligned "
                         "to the tiny critic)")
    compare.add_argument("--methods", default="nabla,nft,grpo,reward_backprop", metavar="LIST",
                         help="comma-separated algorithms (default: nabla,nft,grpo,reward_backprop)")
    compare.add_argument("--seeds", type=int, default=2, metavar="N", help="training seeds 0..N-1 per method (default 2)")
    compare.add_argument("--epochs", type=int, default=None, metavar="N",
                         help="trained epochs per run (default: 10 without --config, the budget that fits 40 minutes "
                              "on a 2-core CPU; else the config's training.epochs)")
    compare.add_argument("--out", default=None, metavar="DIR", help="results directory (default: <output_dir>/compare)")
    compare.add_argument("--experiment", default=None, metavar="NAME",
                         help="MLflow experiment of the runs (default: compare-<date>)")
    compare.set_defaults(func=cmd_compare)

    pretrain = sub.add_parser("pretrain", help="train the tiny splat prior (the embedded default's base model) on CPU")
    add_config_args(pretrain, what="YAML pretraining options, e.g. configs/tiny_prior.yaml")
    pretrain.add_argument("--out", required=True, metavar="DIR", help="where to save the model (save_pretrained layout)")
    pretrain.set_defaults(func=cmd_pretrain)

    train_critic = sub.add_parser("train-critic", help="train the tiny critic (the embedded default's learned 2D reward) on CPU")
    add_config_args(train_critic, what="YAML critic training options, e.g. configs/tiny_critic.yaml")
    train_critic.add_argument("--out", required=True, metavar="DIR", help="where to save the critic (model.safetensors, config.json)")
    train_critic.set_defaults(func=cmd_train_critic)

    eval_prior = sub.add_parser("eval-prior", help="the tiny prior's quality: colour accuracy and silhouette IoU on held-out prompts")
    eval_prior.add_argument("--model", metavar="DIR", help="a tiny prior directory (default: the committed one)")
    eval_prior.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    eval_prior.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    eval_prior.add_argument("--guidance-scale", type=float, default=None,
                            help="CFG scale (default: r2d3ray.eval.prior.GUIDANCE_SCALE, 2.0, where the prior's quality is stated)")
    eval_prior.add_argument("--out", metavar="FILE", help="also write the numbers as JSON")
    eval_prior.set_defaults(func=cmd_eval_prior)

    serve = sub.add_parser("serve", help="deploy the reward plane (a Ray Serve app) and leave it running for other jobs")
    add_config_args(serve, what="YAML reward app config, e.g. configs/rewards_toy.yaml")
    serve.add_argument("--address", default="auto",
                       help="the Ray cluster, as everywhere in r2d3ray: 'auto' (a running one: deploy and return, the "
                            "app stays up; the default), 'local' (a new one in this process: blocks until Ctrl-C) "
                            "or an address such as ray://head:10001")
    serve.set_defaults(func=cmd_serve)

    prepare = sub.add_parser(
        "prepare-diffsplat",
        help="write a DiffSplat model directory (transformer, GS-VAE, scheduler, T5 prompt cache) from the released files",
        description="Prepare the directory that model.kind=diffsplat loads, from DiffSplat's and PixArt-Sigma's "
        "released files (nothing is downloaded). Each step is skipped when already done; the T5 prompt cache is "
        "written in shards of 1000 prompts and a re-run encodes only the missing prompts. The shipped sample "
        "prompts and the empty prompt are always cached. See r2d3ray/models/prepare.py.",
    )
    prepare.add_argument("--diffsplat", required=True, metavar="DIR",
                         help="chenguolin/DiffSplat as `download_ckpt.py --model_type pas` fetches it "
                              "(gsdiff_gobj83k_pas_fp16__render/, gsvae_gobj265k_sdxl_fp16/; newest iteration of each)")
    prepare.add_argument("--pixart", required=True, metavar="DIR",
                         help="PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (tokenizer/, text_encoder/, vae/, scheduler/)")
    prepare.add_argument("--out", metavar="DIR", help="the model directory to write (default with --config: its model.path)")
    add_config_args(prepare, required=False,
                     what="a DiffSplat run config: also cache its prompts.file and tracking.eval_prompts")
    prepare.add_argument("--prompts", action="append", default=[], metavar="FILE",
                         help="a prompt file (.txt or .parquet) whose prompts to cache (repeatable)")
    prepare.add_argument("--reference-cache", metavar="DIR",
                         help="import Nabla-R2D3's cached embeddings (its *prompt_embeds.pt, masks and prompt .txt) first")
    prepare.add_argument("--batch-size", type=int, default=64, help="prompts per T5 forward pass (default 64)")
    prepare.add_argument("--address", default=None,
                         help="encode on this Ray cluster with Ray Data, one T5 per GPU ('auto', 'ray://...', or "
                              "'local' for a new local instance); default: on this machine, CUDA when available")
    prepare.add_argument("--num-encoders", type=int, default=None,
                         help="T5 replicas with --address (default: one per GPU of the cluster)")
    prepare.set_defaults(func=cmd_prepare_diffsplat)

    from r2d3ray.eval.commands import register as register_eval_commands  # imports _add_config_args from here

    register_eval_commands(sub)

    export = sub.add_parser(
        "export", help="write a run's LoRA (diffusers and peft layouts), the base model with it merged, and a model card",
        description="Export a trained run into DIR: lora/ (diffusers' pytorch_lora_weights.safetensors), peft/ "
                    "(adapter_model.safetensors for PeftModel.from_pretrained), merged/ (the base model with the LoRA "
                    "merged, in the base model's own layout: load it as model.path with no LoRA), config.yaml and "
                    "README.md, a model card with the base model, algorithm, rewards, training state and the "
                    "evaluation numbers of `r2d3ray eval` reports that list the LoRA. See r2d3ray/export.py.",
    )
    export.add_argument("--run", required=True, metavar="PATH",
                        help="a run directory (its newest checkpoint), a training checkpoint (its lora/) or a LoRA directory")
    export.add_argument("--out", required=True, metavar="DIR", help="the export directory to write (new or empty)")
    add_config_args(export, required=False,
                    what="the run config (default: the one the checkpoint's state.json holds; required for a bare "
                         "LoRA directory)")
    export.add_argument("--eval", action="append", default=[], metavar="REPORT",
                        help="an `r2d3ray eval` report directory (or its metrics.json) or a `make demo` "
                             "demo_summary.json whose numbers go into the card (repeatable); reports under "
                             "<output_dir>/eval that list the LoRA are found without it")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="run a benchmark; prints a table and writes JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    for name, help_text in BENCHMARKS.items():
        one = bench_sub.add_parser(name, help=help_text, description=f"{help_text}. Arguments after `{name}` go to "
                                   f"benchmarks/bench_{name}.py (see `r2d3ray bench {name} --help`).")
        one.add_argument("bench_args", nargs=argparse.REMAINDER, help="e.g. --quick --out results.json")
        one.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 3 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        # Everything after the benchmark's name is the benchmark's own (argparse would mix them up).
        argv = argv[:2] + ["--", *[a for a in argv[2:] if a != "--"]]
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is cmd_render and (args.views < 1 or args.size < 8):
        print("error: --views must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (UserError, ValueError, FileNotFoundError) as err:
        # r2d3ray's own errors, bad shapes and malformed files carry a message written for the user.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
