"""MLflow tracking: one run per training run, reattached on resume, written by rank 0 only.

The store is a local sqlite file under the output directory unless the config or
MLFLOW_TRACKING_URI names another (MLflow 3.x wants an explicit URI; a file store is refused by
default). Open the UI with `mlflow ui --backend-store-uri <uri>`.

Ray Train V2 rejects Tune's MLflowLoggerCallback, so the train loop logs with plain `mlflow` calls
on rank 0 (as Ray Train's MLflow examples do); the run id travels in every checkpoint so a restarted worker or a
re-submitted job continues the same run instead of opening a duplicate.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

# MLflow accepts only these characters in metric and param keys.
_KEY_OK = re.compile(r"[^\w./\- :]")


def resolve_tracking_uri(configured: str, output_dir: str | Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class Tracker:
    """A thin, rank-aware handle on one MLflow run; every method is a no-op when `active` is False."""

    def __init__(self, tracking_uri: str, experiment: str, active: bool = True):
        self.active = active
        self.run_id: str | None = None
        self.last_logged_step = -1
        if not active:
            return
        import mlflow

        self._mlflow = mlflow
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):  # sqlite creates the file, not its folder
            store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
            store_dir.mkdir(parents=True, exist_ok=True)
            # MLflow's default is ./mlruns under the current directory; keep artifacts beside the store.
            artifact_location = (store_dir / "mlartifacts").as_uri()
        mlflow.set_tracking_uri(tracking_uri)
        if artifact_location and mlflow.get_experiment_by_name(experiment) is None:
            try:
                mlflow.create_experiment(experiment, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:  # created meanwhile by another process
                pass
        self.experiment_id = mlflow.set_experiment(experiment).experiment_id

    def start(self, run_name: str, run_id: str | None = None, tags: dict[str, str] | None = None,
              system_metrics: bool = False) -> str | None:
        """Open a new run, or continue `run_id` (resume) so metrics land in the same run;
        ``system_metrics`` also samples CPU, memory and GPU use into it (MLflow's monitor)."""
        if not self.active:
            return None
        if run_id is None:
            # A re-submitted job with the same run name continues that run, not a duplicate.
            found = self._mlflow.search_runs(
                experiment_ids=[self.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                max_results=1, output_format="list",
            )
            run_id = found[0].info.run_id if found else None
        # Made active by id: when two jobs create the experiment at once, the one that loses the race gets
        # it back from mlflow.set_experiment(name) without it becoming MLflow's active experiment, and its
        # run would land in "Default" (and a resume of that run fail on the experiment mismatch).
        self._mlflow.set_experiment(experiment_id=self.experiment_id)
        run = self._mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags,
                                     log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        # A worker restarted from an older checkpoint than its last logged step redoes some steps;
        # their metrics are logged once only (the first time).
        history = self._mlflow.MlflowClient().get_metric_history(self.run_id, "epoch") if run_id else []
        self.last_logged_step = max((m.step for m in history), default=-1)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        existing = self._mlflow.get_run(self.run_id).data.params
        fresh = {_KEY_OK.sub("_", k): str(v)[:6000] for k, v in params.items() if _KEY_OK.sub("_", k) not in existing}
        if fresh:  # params are immutable in MLflow; on resume only new keys are logged
            self._mlflow.log_params(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and step > self.last_logged_step:
            clean = {_KEY_OK.sub("_", k): float(v) for k, v in metrics.items() if np.isfinite(float(v))}
            self._mlflow.log_metrics(clean, step=step)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """image (H, W, 3) uint8 or float in [0, 1]; logged as a time series under `key`."""
        if self.active:
            self._mlflow.log_image(image, key=_KEY_OK.sub("_", key), step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self._mlflow.end_run(status=status)
