"""Ray job: align a generator with rewards (the same as `r2d3ray train`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config configs/diffsplat_pas_hps.yaml [--set training.lr=1e-4] [--dry-run]

The job connects to its cluster, deploys the reward app named in the config or reuses the one
already running under that name, and runs the TorchTrainer. Submitting the same run name again
resumes from its latest checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job runs from the uploaded working directory; make the package importable from it even
# where the cluster's environment does not have r2d3ray installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2d3ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
