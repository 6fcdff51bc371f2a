"""Ray job: deploy the reward plane (a Ray Serve app) on the cluster and leave it running.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve_rewards.py --config configs/rewards_toy.yaml [--set http.port=8001]

The same command as `r2d3ray serve` (its --address defaults to the job's cluster). The job returns
once the app is up; the app stays on the cluster for training jobs (Serve handles) and other
clients (HTTP). Submitting it again reuses the running app.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job runs from the uploaded working directory; make the package importable from it even
# where the cluster's environment does not have r2d3ray installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2d3ray.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
