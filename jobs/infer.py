"""Ray job: `r2d3ray infer` spread over Ray actors, for prompt sets too big for one process.

    ray job submit --working-dir . -- python jobs/infer.py --config configs/toy.yaml \
        --prompts prompts.txt --out outputs/infer [--lora DIR] [--num-workers N]

Each actor loads the pipeline once and samples whole batches; batch k draws its noise from
(seed, k) exactly as `r2d3ray infer` does, so the files are the same whichever actor made them
(`r2d3ray.infer.infer_on_ray`). Actors send the files back to the driver, which writes them under
--out: no shared filesystem is needed. Without a cluster (no RAY_ADDRESS) a local Ray instance is
started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The job runs from the uploaded working directory; make the package importable from it even
# where the cluster's environment does not have r2d3ray installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2d3ray.config import load_config  # noqa: E402
from r2d3ray.eval.prompts import read_prompts  # noqa: E402
from r2d3ray.infer import InferOptions, infer_on_ray  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML run config, e.g. configs/toy.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set sampling.num_steps=10 (repeatable)")
    parser.add_argument("--prompts", required=True, metavar="FILE", help="a text file (one per line) or Parquet prompt set")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (on the driver's machine)")
    parser.add_argument("--lora", metavar="DIR", help="a LoRA directory or a checkpoint containing lora/ (default: base)")
    parser.add_argument("--num-workers", type=int, default=2, metavar="N", help="Ray actors, one pipeline each (default 2)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per actor (default: 1 when the cluster has a GPU per actor, else 0)")
    parser.add_argument("--tag", default="", help="suffix for the file names")
    parser.add_argument("--vis-normal", action="store_true", help="also write rendered-normal grids")
    parser.add_argument("--random-view", action="store_true", help="jitter the grid cameras as training does")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: sampling.batch_size)")
    parser.add_argument("--size", type=int, default=None, help="view size in pixels (default: render.size)")
    parser.add_argument("--frames", type=int, default=36, help="turntable frames (default 36; 0: no GIF)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        prompts = read_prompts(args.prompts)
        opts = InferOptions(seed=args.seed, batch_size=args.batch_size or cfg.sampling.batch_size,
                            size=args.size or cfg.render.size, tag=args.tag, vis_normal=args.vis_normal,
                            random_view=args.random_view, frames=args.frames)
        written = infer_on_ray(cfg, prompts, args.out, opts, args.lora, args.num_workers, args.gpus_per_worker)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files for {len(prompts)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
