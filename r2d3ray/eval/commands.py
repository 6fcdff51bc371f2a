"""The `infer`, `eval` and `precompute-rewards` subcommands; `r2d3ray.cli` calls `register(subparsers)`.

    r2d3ray infer --config F (--prompts FILE | --prompt TEXT) --out DIR [--lora DIR] [--tag T] [--vis-normal]
                  [--random-view]            (`r2d3ray sample` is the same command)
    r2d3ray eval --config F --runs base,RUN1,... --prompts FILE [--seeds N] [--out DIR]
    r2d3ray precompute-rewards --config F --prompts FILE --out FILE.parquet [--seeds N]

Each command function returns an exit code; problems the user can fix raise ValueError or
FileNotFoundError, which the CLI prints as one `error:` line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_infer(args: argparse.Namespace) -> int:
    from r2d3ray.config import load_config
    from r2d3ray.eval.prompts import read_prompts
    from r2d3ray.infer import InferOptions, build_pipeline, infer, infer_on_ray

    cfg = load_config(args.config, args.overrides)
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    opts = InferOptions.checked(seed=args.seed, batch_size=args.batch_size or cfg.sampling.batch_size,
                                size=args.size or cfg.render.size, tag=args.tag, vis_normal=args.vis_normal,
                                random_view=args.random_view, frames=args.frames)
    if args.num_workers:  # the same files, from batches spread over Ray actors
        written = infer_on_ray(cfg, prompts, args.out, opts, args.lora, args.num_workers, args.gpus_per_worker)
    else:
        written = infer(build_pipeline(cfg, args.lora), prompts, args.out, opts, cfg.render)
    print(f"wrote {len(written)} files for {len(prompts)} prompts to {args.out} "
          f"({'LoRA ' + args.lora if args.lora else 'base model'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from r2d3ray.config import load_config
    from r2d3ray.eval.metrics import evaluate, parse_runs
    from r2d3ray.eval.prompts import read_prompts
    from r2d3ray.eval.report import log_evaluation, write_report
    from r2d3ray.tracking import resolve_tracking_uri

    cfg = load_config(args.config, args.overrides)
    if args.seeds < 1 or args.pictures < 0:
        raise ValueError(f"--seeds {args.seeds} / --pictures {args.pictures}: expected --seeds >= 1 (2 or more "
                         "to measure diversity) and --pictures >= 0")
    runs = parse_runs(args.runs)
    prompts = read_prompts(args.prompts, split=args.split)
    name = args.name or time.strftime("eval-%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "eval" / name
    evaluation = evaluate(cfg, runs, prompts, list(range(args.seeds)), args.batch_size or cfg.sampling.batch_size,
                          args.clip_checkpoint, args.pictures)
    tracking_uri = None if args.no_mlflow else resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    index = write_report(evaluation, out, tracking_uri, evaluation.splats or None, cfg.render.gaussian_convention)
    print((out / "summary.md").read_text())
    if tracking_uri:
        run_id = log_evaluation(evaluation, out, tracking_uri, cfg.tracking.experiment, name,
                                {**cfg.flat(), "eval.prompts_file": args.prompts})
        print(f"MLflow run {run_id} ({name!r}) in {tracking_uri}")
    print(f"report: {index}")
    return 0


def cmd_precompute_rewards(args: argparse.Namespace) -> int:
    from r2d3ray.config import load_config
    from r2d3ray.eval.metrics import base_model_rewards
    from r2d3ray.eval.prompts import read_prompts, write_reward_cache

    cfg = load_config(args.config, args.overrides)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: expected >= 1")
    if Path(args.out).suffix != ".parquet":
        raise ValueError(f"--out {args.out!r}: reward caches are written as Parquet; use a .parquet name")
    prompts = read_prompts(args.prompts)
    rows = base_model_rewards(cfg, prompts, list(range(args.seeds)), args.batch_size or cfg.sampling.batch_size)
    path = write_reward_cache(args.out, rows)
    print(f"wrote {len(rows)} rewards ({len(prompts)} prompts x {args.seeds} seeds x "
          f"{len(cfg.rewards.terms)} terms) to {path}")
    return 0


def register(subparsers) -> None:
    """Add `infer`, `eval` and `precompute-rewards` to the CLI's subparsers."""
    from r2d3ray.cli_args import add_config_args

    infer = subparsers.add_parser(
        "infer", aliases=["sample"],
        help="sample a base model (and a LoRA): per prompt a PLY, a multi-view grid PNG and a turntable GIF",
        description="Sample prompts with the config's base model, or with a LoRA on it, and write per prompt "
                    "<index>_<prompt>[_TAG].ply (3DGS), .png (multi-view grid) and .gif (turntable). "
                    "`r2d3ray sample` is the same command.",
    )
    add_config_args(infer)
    which = infer.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompts", metavar="FILE",
                       help="prompts: a text file (one per line) or a Parquet prompt set with a 'prompt' column")
    which.add_argument("--prompt", metavar="TEXT", help='one prompt, e.g. "a red cube"')
    infer.add_argument("--out", required=True, metavar="DIR", help="output directory")
    infer.add_argument("--lora", metavar="DIR",
                       help="a LoRA directory, or a training checkpoint containing lora/ (default: the base model)")
    infer.add_argument("--tag", default="", help="suffix for the file names, e.g. the run name")
    infer.add_argument("--vis-normal", action="store_true",
                       help="also write <name>_normals.png: rendered normals (camera space) as colours (n+1)/2")
    infer.add_argument("--random-view", action="store_true",
                       help="jitter the grid cameras as training's reward renders do (render.azi_delta_deg, ...)")
    infer.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    infer.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help="prompts per sampling batch (default: sampling.batch_size)")
    infer.add_argument("--size", type=int, default=None, metavar="PX",
                       help="view size in pixels of grids and GIFs (default: render.size)")
    infer.add_argument("--frames", type=int, default=36, metavar="N", help="turntable frames (default 36; 0: no GIF)")
    infer.add_argument("--num-workers", type=int, default=0, metavar="N",
                       help="spread the batches over N Ray actors, one pipeline each, on the cluster of RAY_ADDRESS "
                            "(else a local one); the files are the same (default 0: in this process)")
    infer.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                       help="GPUs per actor with --num-workers (default: 1 when the cluster has a GPU per actor, else 0)")
    infer.set_defaults(func=cmd_infer)

    evaluate = subparsers.add_parser(
        "eval", help="compare the base model with fine-tuned runs on held-out prompts; writes an HTML report",
        description="Sample each model on the same prompts and seeds and report, with standard errors: the "
                    "configured rewards, text-object alignment (colour accuracy / silhouette IoU in the tiny "
                    "world; CLIP score with a CLIP checkpoint), prior preservation (KID-style distance to the "
                    "base model's samples), diversity across seeds and DNC geometry. Writes index.html, "
                    "summary.md, metrics.json and samples.parquet, and logs one MLflow run tagged with the "
                    "compared runs.",
    )
    add_config_args(evaluate)
    evaluate.add_argument("--runs", required=True, metavar="base,RUN,...",
                          help="comma-separated models: 'base', LoRA directories, training checkpoints "
                               "(containing lora/) or run directories (their newest checkpoint), each optionally as "
                               "LABEL=PATH; the base model is always included")
    evaluate.add_argument("--prompts", required=True, metavar="FILE",
                          help="held-out prompts: a text file (one per line) or a Parquet prompt set")
    evaluate.add_argument("--split", default=None, help="with a Parquet prompt set: use only the rows of this split")
    evaluate.add_argument("--seeds", type=int, default=4, metavar="N", help="seeds 0..N-1 per prompt (default 4)")
    evaluate.add_argument("--out", default=None, metavar="DIR",
                          help="report directory (default: <output_dir>/eval/<name>)")
    evaluate.add_argument("--name", default=None, help="MLflow run name of the evaluation (default: eval-<time>)")
    evaluate.add_argument("--batch-size", type=int, default=None, metavar="N",
                          help="prompts per sampling batch (default: sampling.batch_size)")
    evaluate.add_argument("--clip-checkpoint", default=None, metavar="FILE",
                          help="OpenAI-format CLIP weights (e.g. ViT-L-14.pt) for CLIP score and CLIP features "
                               "(default: a reward's clip_checkpoint in the reward app config, else none)")
    evaluate.add_argument("--pictures", type=int, default=8, metavar="N",
                          help="prompts shown as before/after grids (default 8)")
    evaluate.add_argument("--no-mlflow", action="store_true",
                          help="do not read training curves from or log the evaluation to MLflow")
    evaluate.set_defaults(func=cmd_eval)

    precompute = subparsers.add_parser(
        "precompute-rewards", help="score the base model on a prompt set with the configured rewards (Parquet cache)",
        description="Sample the base model on every prompt x seed, score each configured reward term in this "
                    "process and write one Parquet row per prompt, seed and term (schema in "
                    "r2d3ray/eval/prompts.py). Filter training prompts with it through prompts.reward_file "
                    "and prompts.reward_threshold.",
    )
    add_config_args(precompute)
    precompute.add_argument("--prompts", required=True, metavar="FILE", help="a text file or a Parquet prompt set")
    precompute.add_argument("--out", required=True, metavar="FILE.parquet", help="the reward cache to write")
    precompute.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per prompt (default 1)")
    precompute.add_argument("--batch-size", type=int, default=None, metavar="N",
                            help="prompts per sampling batch (default: sampling.batch_size)")
    precompute.set_defaults(func=cmd_precompute_rewards)
