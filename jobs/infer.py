"""Ray job: `r2d3ray infer` with its batches spread over Ray actors, for prompt sets too big for one process.

    ray job submit --working-dir . -- python jobs/infer.py --config configs/toy.yaml \
        --prompts prompts.txt --out outputs/infer --num-workers 4 [--lora DIR] [--gpus-per-worker 1]

The same command and options as `r2d3ray infer` (see `r2d3ray infer --help`). With --num-workers N
each actor loads the pipeline once and samples whole batches; batch k draws its noise from
(seed, k) exactly as in one process, so the files are the same whichever actor made them. Actors
send the files back to the driver, which writes them under --out: no shared filesystem is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job runs from the uploaded working directory; make the package importable from it even
# where the cluster's environment does not have r2d3ray installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2d3ray.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main(["infer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
