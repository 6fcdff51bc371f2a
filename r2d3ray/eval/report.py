"""The comparison report of an evaluation: one HTML page, a Markdown summary, data files, one MLflow run.

``write_report(evaluation, out_dir, tracking_uri)`` writes into ``out_dir``:

    index.html          open this: verdict, metrics table, training curves, before/after grids
    summary.md          the verdict and the metrics table in Markdown (also the MLflow run's note)
    metrics.json        summary (mean, standard error) per run and metric, settings, notes, cost
    samples.parquet     one row per run x prompt x seed with every per-sample metric
    figures/*.png       metrics.png (bars ± SE), curves.png (reward vs step of the training runs,
                        from MLflow), grid_<i>.png (one row per run, same prompt and seed)
    viewer/             when splats are given: interactive 3D views of the same objects, one per run
                        side by side under each grid (r2d3ray/eval/viewer.py); works opened from disk

Training runs are found in MLflow by the checkpoint's ``state.json`` ``mlflow_run_id``, else by run
name (the checkpoint config's name, or the label given as ``label=PATH``). Their wall time and
optimizer steps are the "cost" column.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from r2d3ray.eval import viewer
from r2d3ray.eval.metrics import Evaluation, RunSpec, higher_is_better, mean_se
from r2d3ray.render.pictures import save_grid_png
from r2d3ray.splats import Splats


@dataclass
class TrainingHistory:
    """What MLflow knows about one compared training run."""

    run_id: str
    curves: dict[str, list[tuple[int, float]]]  # metric key -> [(step, value)] of the reward/* metrics
    wall_time_s: float | None
    steps: int | None


def training_history(run: RunSpec, tracking_uri: str) -> TrainingHistory | None:
    """The MLflow run behind ``run`` (by id, else by name) and its reward curves; None when not found."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = None
    try:
        if run.mlflow_run_id:
            found = client.get_run(run.mlflow_run_id)
        else:
            experiments = [e.experiment_id for e in client.search_experiments()]
            hits = client.search_runs(experiments, filter_string=f"tags.mlflow.runName = '{run.run_name}'",
                                      max_results=1) if experiments else []
            found = hits[0] if hits else None
    except MlflowException:
        return None
    if found is None:
        return None
    run_id = found.info.run_id
    keys = sorted(k for k in found.data.metrics if k.startswith("reward/") and not k.endswith("/std"))
    history = {k: client.get_metric_history(run_id, k) for k in keys}
    curves = {k: [(m.step, m.value) for m in points] for k, points in history.items()}
    stamps = [m.timestamp for points in history.values() for m in points]
    end = found.info.end_time or (max(stamps) if stamps else None)
    wall = (end - found.info.start_time) / 1000 if end and found.info.start_time else None
    steps = run.state.get("global_step")
    if steps is None and "global_step" in found.data.metrics:
        steps = int(found.data.metrics["global_step"])
    return TrainingHistory(run_id, curves, wall, steps)


def _cell(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g} ± {se:.2g}" if not math.isnan(se) else f"{mean:.4g}"


def _best(evaluation: Evaluation, metric: str) -> str | None:
    """The run with the strictly best mean on ``metric`` (None when fewer than two runs have it or
    the best is tied)."""
    scored = {label: v[metric][0] for label, v in evaluation.summary.items()
              if metric in v and not math.isnan(v[metric][0])}
    if len(scored) < 2:
        return None
    best = (max if higher_is_better(metric) else min)(scored.values())
    winners = [label for label, value in scored.items() if value == best]
    return winners[0] if len(winners) == 1 else None


def _cost(history: TrainingHistory | None) -> str:
    if history is None:
        return "–"
    parts = []
    if history.steps is not None:
        parts.append(f"{history.steps} steps")
    if history.wall_time_s is not None:
        wall = history.wall_time_s
        parts.append(f"{wall:.0f} s" if wall < 120 else f"{wall / 60:.1f} min" if wall < 7200 else f"{wall / 3600:.1f} h")
    return ", ".join(parts) or "–"


def verdict(evaluation: Evaluation) -> str:
    """One sentence: which run has the highest reward, by how much over the base, at what prior cost."""
    base = evaluation.runs[0].label
    best = _best(evaluation, "reward")
    if best is None:
        return "Only the base model was evaluated."
    if best == base:
        return f"No fine-tuned run has a higher mean reward than the base model ({base})."
    # Samples are paired (same prompt, same seed, same initial noise), so the paired difference is
    # the sharper comparison.
    base_reward = {(s["prompt"], s["seed"]): s["reward"] for s in evaluation.samples if s["run"] == base}
    gain, gain_se = mean_se([s["reward"] - base_reward[(s["prompt"], s["seed"])]
                             for s in evaluation.samples if s["run"] == best])
    kid_mean, kid_se = evaluation.summary[best]["prior_kid"]
    return (f"Highest reward: **{best}**, {gain:+.4g} ± {gain_se:.2g} over {base} (paired by prompt and seed); "
            f"prior_kid {_cell(kid_mean, kid_se)} (0 = indistinguishable from the base model).")


def markdown_summary(evaluation: Evaluation, histories: dict[str, TrainingHistory | None]) -> str:
    metrics = evaluation.metrics
    header = ["run", *metrics, "training cost"]
    lines = [
        f"# Evaluation: {len(evaluation.runs)} models, {len(evaluation.prompts)} prompts x "
        f"{len(evaluation.seeds)} seeds",
        "",
        verdict(evaluation),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for run in evaluation.runs:
        cells = []
        for metric in metrics:
            mean, se = evaluation.summary[run.label].get(metric, (math.nan, math.nan))
            cell = _cell(mean, se)
            cells.append(f"**{cell}**" if _best(evaluation, metric) == run.label else cell)
        lines.append(f"| {run.label} | " + " | ".join(cells) + f" | {_cost(histories.get(run.label))} |")
    lines += [
        "",
        "Mean ± standard error over prompts x seeds (diversity: over prompts; prior_kid: jackknife). "
        "Best per column in bold; higher is better except prior_kid.",
        f"Features for prior_kid and diversity: {evaluation.feature_space}.",
    ]
    lines += [f"Note: {note}" for note in evaluation.notes]
    return "\n".join(lines) + "\n"


def _plot_metrics(evaluation: Evaluation, path: Path) -> None:
    import matplotlib.pyplot as plt

    metrics = evaluation.metrics
    labels = [run.label for run in evaluation.runs]
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        values = [evaluation.summary[label].get(metric, (math.nan, math.nan)) for label in labels]
        means = [m for m, _ in values]  # NaN: no bar
        errors = [0.0 if math.isnan(s) else s for _, s in values]
        ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({'↑' if higher_is_better(metric) else '↓'})", fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(histories: dict[str, TrainingHistory | None], path: Path) -> bool:
    import matplotlib.pyplot as plt

    keys = sorted({k for h in histories.values() if h for k in h.curves})
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (label, history) in enumerate(histories.items()):
            points = sorted(history.curves.get(key, [])) if history else []
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=label, color=f"C{i}")
        ax.set_xlabel("step (epoch)")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _html_table(markdown: str) -> str:
    """The Markdown table lines of ``markdown_summary`` as an HTML table."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    out = ["<table>"]
    for r, cells in enumerate(rows):
        tag = "th" if r == 0 else "td"
        rendered = []
        for cell in cells:
            cell = cell.strip()
            text = html.escape(cell.strip("*"))
            rendered.append(f"<{tag}>{'<b>' + text + '</b>' if cell.startswith('**') else text}</{tag}>")
        out.append("<tr>" + "".join(rendered) + "</tr>")
    return "\n".join(out + ["</table>"])


def write_report(evaluation: Evaluation, out_dir: str | Path, tracking_uri: str | None = None,
                 splats: dict[str, Splats] | None = None, gaussian_convention: str = "gsplat",
                 viewer_gaussians: int = viewer.DEFAULT_MAX_GAUSSIANS) -> Path:
    """Write the report files into ``out_dir`` (see the module docstring); returns index.html's path.
    ``tracking_uri``: the MLflow store holding the training runs (None: no curves or cost).
    ``splats``: run label -> the (P', N) objects behind ``evaluation.pictures`` (first prompts, first
    seed), shown as 3D viewers drawn in ``gaussian_convention`` with at most ``viewer_gaussians``
    Gaussians each; None: pictures only."""
    out_dir = Path(out_dir)
    labels = [run.label for run in evaluation.runs]
    if splats is not None and list(splats) != labels:
        raise ValueError(f"write_report: splats are labelled {list(splats)}, expected the runs {labels} in order")
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window

    histories = {run.label: training_history(run, tracking_uri) if tracking_uri and run.lora else None
                 for run in evaluation.runs}
    summary_md = markdown_summary(evaluation, histories)
    (out_dir / "summary.md").write_text(summary_md)
    pq.write_table(pa.Table.from_pylist(evaluation.samples), out_dir / "samples.parquet")
    def finite(value):  # strict JSON has no NaN
        return None if isinstance(value, float) and math.isnan(value) else value

    (out_dir / "metrics.json").write_text(json.dumps({
        "runs": [{"label": r.label, "lora": str(r.lora) if r.lora else None,
                  "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                  "mlflow_run_id": histories[r.label].run_id if histories[r.label] else r.mlflow_run_id,
                  "training_steps": histories[r.label].steps if histories[r.label] else r.state.get("global_step"),
                  "training_wall_time_s": histories[r.label].wall_time_s if histories[r.label] else None}
                 for r in evaluation.runs],
        "prompts": evaluation.prompts, "seeds": evaluation.seeds, "feature_space": evaluation.feature_space,
        "summary": {label: {k: {"mean": finite(m), "se": finite(s)} for k, (m, s) in v.items()}
                    for label, v in evaluation.summary.items()},
        "notes": evaluation.notes,
    }, indent=1, allow_nan=False))

    _plot_metrics(evaluation, figures / "metrics.png")
    has_curves = _plot_curves(histories, figures / "curves.png")  # all runs, so colours match metrics.png
    grids = []
    for i, prompt in enumerate(evaluation.prompts[: min(len(p) for p in evaluation.pictures.values())]):
        path = figures / f"grid_{i:03d}.png"
        save_grid_png([evaluation.pictures[label][i] for label in labels], path)  # one row per run
        grids.append((prompt, path.relative_to(out_dir)))
    views = viewer.write_viewers(out_dir, splats, evaluation.prompts, gaussian_convention,
                                 viewer_gaussians) if splats else []
    before_after = []
    for i, prompt in enumerate(evaluation.prompts[: max(len(grids), len(views))]):
        if i < len(grids):
            before_after.append(f"<figure><img src='{grids[i][1]}'><figcaption>{html.escape(prompt)}</figcaption></figure>")
        if i < len(views):
            before_after.append(views[i] if i < len(grids) else f"<p>{html.escape(prompt)}</p>{views[i]}")

    esc = html.escape
    body = [
        f"<h1>{esc(summary_md.splitlines()[0].lstrip('# '))}</h1>",
        f"<p>{esc(verdict(evaluation)).replace('**', '')}</p>",
        _html_table(summary_md),
        f"<p>Mean ± standard error over prompts × seeds (diversity: over prompts; prior_kid: jackknife). "
        f"Bold: best per column; higher is better except prior_kid. Features: {esc(evaluation.feature_space)}.</p>",
        *[f"<p class='note'>Note: {esc(note)}</p>" for note in evaluation.notes],
        "<h2>Metrics</h2><img src='figures/metrics.png'>",
        "<h2>Training reward</h2>",
        "<img src='figures/curves.png'>" if has_curves else
        "<p>No training curves: no compared run was found in MLflow "
        f"({esc(tracking_uri or 'no tracking URI')}).</p>",
        f"<h2>Before / after (seed {evaluation.seeds[0]})</h2>",
        f"<p>Rows, top to bottom: {esc(', '.join(labels))}. Same prompt and seed, so the same initial noise.</p>",
        *([f"<p>{esc(viewer.HELP)}</p>"] if views else []),
        *before_after,
        *([viewer.SCRIPT_TAG] if views else []),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}.note{color:#a50}"
             + (viewer.STYLE if views else ""))
    index = out_dir / "index.html"
    index.write_text("<!doctype html><html><head><meta charset='utf-8'><title>r2d3ray evaluation</title>"
                     f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return index


def log_evaluation(evaluation: Evaluation, report_dir: str | Path, tracking_uri: str, experiment: str,
                   run_name: str, params: dict | None = None) -> str:
    """One MLflow run for this evaluation, tagged with the compared runs' paths and MLflow run ids;
    metrics ``<label>/<metric>`` (and ``_se``), the summary as the run's note, the report as artifacts."""
    from r2d3ray.tracking import Tracker

    tags = {"r2d3ray.kind": "evaluation", "eval.runs": ",".join(r.label for r in evaluation.runs)}
    report = json.loads((Path(report_dir) / "metrics.json").read_text())
    for i, run in enumerate(report["runs"]):
        tags[f"eval.run{i}.label"] = run["label"]
        tags[f"eval.run{i}.lora"] = run["lora"] or "base model"
        if run["mlflow_run_id"]:
            tags[f"eval.run{i}.mlflow_run_id"] = run["mlflow_run_id"]
    tags["mlflow.note.content"] = (Path(report_dir) / "summary.md").read_text()
    tracker = Tracker(tracking_uri, experiment)
    run_id = tracker.start(run_name, tags=tags)
    tracker.log_params({**(params or {}), "eval.num_prompts": len(evaluation.prompts),
                        "eval.seeds": ",".join(map(str, evaluation.seeds)), "eval.feature_space": evaluation.feature_space})
    metrics = {}
    for label, values in evaluation.summary.items():
        for metric, (mean, se) in values.items():
            metrics[f"{label}/{metric}"] = mean
            metrics[f"{label}/{metric}_se"] = se
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(report_dir, "report")
    tracker.end()
    return run_id
