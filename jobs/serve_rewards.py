"""Ray job: deploy the reward plane (a Ray Serve app) on the cluster and leave it running.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve_rewards.py --config configs/rewards_toy.yaml [--set http.port=8001]

The job returns once the app is up; the app stays on the cluster for training jobs (Serve
handles) and other clients (HTTP). Submitting it again reuses the running app.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The job runs from the uploaded working directory; make the package importable from it even
# where the cluster's environment does not have r2d3ray installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2d3ray.serve.launch import serve_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="reward app config, e.g. configs/rewards_toy.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set http.port=8001 (repeatable)")
    parser.add_argument("--address", default="auto",
                        help="'auto' (the job's cluster, default), 'local' (a new cluster; blocks), or a Ray address")
    args = parser.parse_args(argv)
    try:
        return serve_main(args.config, args.overrides, args.address)
    except ValueError as err:  # a bad config: one line naming the key
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
