"""`r2d3ray compare`: the alignment algorithms side by side on one budget, in one MLflow experiment.

    r2d3ray compare [--config F] [--methods nabla,nft,grpo,reward_backprop] [--seeds 2] [--epochs N]
                    [--out DIR] [--experiment NAME] [--set k=v ...]

For each method x seed the driver derives a run config from one base config (default:
``configs/toy_critic.yaml``, the embedded default aligned to the learned critic) that differs only in
``algorithm.name``, ``training.seed`` and the name ``compare-<method>-seed<k>-<date>``, so every run
samples the same number of trajectories per epoch for the same number of epochs and takes the same
optimizer steps (checked before anything trains). The runs train one after another on one Ray
instance and one reward app, all in the MLflow experiment ``compare-<date>``. A re-run with the same
``--out`` skips the finished runs (their record is ``<out>/runs/<name>.json``) and resumes an
unfinished one from its latest checkpoint.

Each run keeps a checkpoint at ``EVAL_POINTS`` evenly spaced epochs (the last included). The base
model and every kept checkpoint are then sampled by ``eval.metrics.evaluate`` on the held-out prompts
with the same seeds, so sample (prompt, seed) starts from the same noise in every model and a run's
reward gain is paired with the base model's. It writes into ``<out>``:

    compare_summary.json  every number below, per run and evaluation point, and per method
    compare.md            the table: per method, the final checkpoints' held-out reward gain, share of
                          the headroom closed, silhouette IoU, colour accuracy, diversity and KID to the
                          base model, mean ± standard error over the training seeds, and wall time
    compare_curves.png    per method (mean ± s.e. over seeds) against optimizer steps: the training
                          reward (MLflow's ``reward/mean``) and the held-out metrics at step 0 (the
                          base model) and at each evaluation point
    before_after.png      the first held-out prompts (first evaluation seed, first view): the base
                          model's row, then one row per method (its first seed's final checkpoint)
    report/index.html     ``r2d3ray eval``'s report of the final checkpoints (full before/after grids)

The held-out numbers also go into each training run as ``eval/<metric>`` at the evaluated step (the
base model's at step 0), so MLflow's run comparison shows them beside the training curves.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from r2d3ray.config import R2D3Config, load_config
from r2d3ray.errors import UserError
from r2d3ray.eval.stats import mean_se, paired_differences

METHODS = ("nabla", "nft", "grpo", "reward_backprop")
# Without --config: the embedded default aligned to the learned critic, `make demo`'s setting.
DEFAULT_CONFIG = "configs/toy_critic.yaml"
# Without --config or --epochs: the budget that fits 40 minutes on an idle 2-core CPU machine
# (README, "Comparing the algorithms").
DEFAULT_EPOCHS = 10
DEFAULT_SEEDS = 2
EVAL_POINTS = 2            # evaluated checkpoints per run, evenly spaced, the last epoch included
EVAL_SEEDS = [12345, 12346]  # two per prompt: diversity is the spread between one prompt's samples
EVAL_BATCH_SIZE = 16
PICTURE_PROMPTS = 6
# metric -> (table heading, format); the per-method table's columns, in order.
TABLE_COLUMNS = {
    "reward_gain": ("reward gain (paired)", "{:+.3g}"),
    "headroom_closed": ("headroom closed", "{:.1%}"),
    "silhouette_iou": ("silhouette IoU", "{:.4f}"),
    "color_accuracy": ("colour accuracy", "{:.1%}"),
    "diversity": ("diversity", "{:.4f}"),
    "prior_kid": ("KID to base", "{:.3g}"),
}
# The held-out metrics logged into the training runs and plotted against steps.
EVAL_METRICS = ("reward", "reward_gain", "headroom_closed", "silhouette_iou", "color_accuracy", "diversity",
                "prior_kid", "dnc")


class CompareError(UserError, ValueError):
    """A comparison that cannot run as asked; the message says what to change."""


@dataclass
class PlannedRun:
    method: str
    seed: int
    cfg: R2D3Config

    @property
    def name(self) -> str:
        return self.cfg.name


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CompareError(f"--methods {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                           f"choose from {','.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise CompareError(f"--methods {text!r} names a method twice")
    return methods


def base_config(config: str | None, overrides: list[str], epochs: int | None) -> R2D3Config:
    """The comparison's shared setting: the config file (default: the embedded default on the
    critic) with the overrides, ``epochs`` trained epochs and a checkpoint at every evaluation point."""
    if epochs is not None and epochs < 1:
        raise CompareError(f"--epochs {epochs}: expected at least 1")
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if epochs is None and config is None and not any(o.partition("=")[0].strip() == "training.epochs" for o in overrides):
        epochs = DEFAULT_EPOCHS
    epochs = epochs or cfg.training.epochs
    every = math.ceil(epochs / EVAL_POINTS)
    # Ray Train keeps the newest checkpoints: as many as there are evaluation points keeps them all.
    training = cfg.training.model_copy(update={"epochs": epochs, "checkpoint_every": every,
                                               "checkpoints_to_keep": math.ceil(epochs / every)})
    return cfg.model_copy(update={"training": training})


def plan_runs(base: R2D3Config, methods: list[str], seeds: int, date: str, experiment: str) -> list[PlannedRun]:
    """One run config per method x seed, checked to share the sampling and optimizer budget."""
    if seeds < 1:
        raise CompareError(f"--seeds {seeds}: expected at least 1 (2 or more for standard errors over seeds)")
    runs = []
    for method in methods:
        for seed in range(seeds):
            data = base.model_dump(mode="json")
            data["name"] = f"compare-{method}-seed{seed}-{date}"
            data["algorithm"]["name"] = method
            data["training"]["seed"] = seed
            data["tracking"]["experiment"] = experiment
            runs.append(PlannedRun(method, seed, R2D3Config.model_validate(data)))
    budgets = {run.method: (run.cfg.samples_per_epoch(), run.cfg.optimizer_steps_per_epoch()) for run in runs}
    if len(set(budgets.values())) > 1:
        shown = ", ".join(f"{m}: {s} trajectories and {o} optimizer steps" for m, (s, o) in budgets.items())
        raise CompareError(f"the methods would not share one budget per worker and epoch ({shown}); DiffusionNFT and "
                           "GRPO sample whole groups, so make sampling.batch_size a multiple of "
                           "algorithm.nft.group_size and algorithm.grpo.group_size")
    return runs


def _changed_keys(before: dict, after: dict) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]


def open_plan(out: Path, base: R2D3Config, experiment: str | None) -> tuple[str, str]:
    """The comparison's date and experiment: those of ``out``'s earlier start (so a re-run continues
    it), else new ones (``save_plan`` records them once the runs are checked). The shared setting
    must be the one ``out`` was started with."""
    plan_file = out / "compare_plan.json"
    setting = base.flat()
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        changed = _changed_keys(plan["setting"], setting)
        if changed:
            raise CompareError(f"{out} holds a comparison of another setting ({'; '.join(changed[:3])}"
                               f"{'; ...' if len(changed) > 3 else ''}); give the same settings to continue it, "
                               "or a new --out for a new comparison")
        if experiment and experiment != plan["experiment"]:
            raise CompareError(f"{out} was started in MLflow experiment {plan['experiment']!r}, not {experiment!r}; "
                               "leave out --experiment to continue it, or give a new --out")
        return plan["date"], plan["experiment"]
    date = time.strftime("%Y%m%d-%H%M%S")
    return date, experiment or f"compare-{date}"


def save_plan(out: Path, base: R2D3Config, date: str, experiment: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_plan.json").write_text(json.dumps(
        {"date": date, "experiment": experiment, "setting": base.flat()}, indent=1))


def run_checkpoints(cfg: R2D3Config) -> list[dict]:
    """The run's kept checkpoints, oldest first: ``epoch``, ``global_step``, ``path`` and its state.json."""
    from r2d3ray.train.launch import is_uri, storage_path

    storage = storage_path(cfg)
    if is_uri(storage):
        raise CompareError(f"checkpoints go to {storage}; compare evaluates them from a local directory, so set "
                           "training.storage_path to one (or unset R2D3RAY_STORAGE_PATH)")
    found = []
    for path in (Path(storage) / cfg.name).glob("checkpoint_*"):
        if (path / "state.json").is_file() and (path / "lora").is_dir():
            state = json.loads((path / "state.json").read_text())
            found.append({"epoch": state["epoch"], "global_step": state["global_step"], "path": str(path.resolve()),
                          "mlflow_run_id": state.get("mlflow_run_id")})
    return sorted(found, key=lambda c: c["global_step"])


def check_runs(runs: list[PlannedRun]) -> None:
    """Every run's plan (reward app, gradients for the gradient methods, model files, storage), checked
    before the first one trains, so a bad combination stops now, not 30 minutes in."""
    from r2d3ray.train.launch import make_plan, with_absolute_paths

    if runs[0].cfg.model.kind != "tiny":
        raise CompareError("compare evaluates on the tiny world's held-out prompts (silhouette IoU and colour "
                           "accuracy need its ground truth); use it with model.kind tiny")
    for run in runs:
        make_plan(with_absolute_paths(run.cfg))


def train_runs(runs: list[PlannedRun], out: Path) -> dict[str, dict]:
    """Train every run not finished yet, one after another; returns each run's record."""
    from r2d3ray.train.launch import launch

    records_dir = out / "runs"
    records_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for index, run in enumerate(runs, 1):
        record_file = records_dir / f"{run.name}.json"
        if record_file.is_file():
            records[run.name] = json.loads(record_file.read_text())
            print(f"[compare] {index}/{len(runs)} {run.name}: finished earlier, skipped", flush=True)
            continue
        resumed = bool(run_checkpoints(run.cfg))
        print(f"[compare] {index}/{len(runs)} {run.name}: {'resuming' if resumed else 'training'}", flush=True)
        started = time.monotonic()
        launch(run.cfg)
        checkpoints = run_checkpoints(run.cfg)
        if not checkpoints or checkpoints[-1]["epoch"] != run.cfg.training.epochs:
            raise CompareError(f"run {run.name} ended without its final checkpoint under "
                               f"{Path(checkpoints[-1]['path']).parent if checkpoints else 'its storage'}; re-run to "
                               "resume it")
        records[run.name] = {"name": run.name, "method": run.method, "seed": run.seed,
                             "wall_time_s": time.monotonic() - started, "resumed": resumed,
                             "mlflow_run_id": checkpoints[-1]["mlflow_run_id"], "checkpoints": checkpoints}
        record_file.write_text(json.dumps(records[run.name], indent=1))
    return records


def eval_label(record: dict, checkpoint: dict) -> str:
    return f"{record['method']}-seed{record['seed']}@{checkpoint['global_step']}"


def evaluate_runs(base: R2D3Config, records: dict[str, dict], prompts: list[str]):
    """The base model and every kept checkpoint on ``prompts`` x ``EVAL_SEEDS``, in one ``evaluate``."""
    from r2d3ray.eval.metrics import RunSpec, evaluate

    specs = [RunSpec("base")]
    for record in records.values():
        for checkpoint in record["checkpoints"]:
            path = Path(checkpoint["path"])
            specs.append(RunSpec(eval_label(record, checkpoint), path / "lora", path,
                                 json.loads((path / "state.json").read_text())))
    return evaluate(base, specs, prompts, EVAL_SEEDS, batch_size=EVAL_BATCH_SIZE, max_pictures=PICTURE_PROMPTS)


def _pair(values: tuple[float, float]) -> dict:
    mean, se = values
    return {"mean": None if math.isnan(mean) else mean, "se": None if math.isnan(se) else se}


def point_metrics(evaluation, label: str, headroom: float) -> dict[str, dict]:
    """One evaluated model's held-out metrics, each as {mean, se}."""
    summary = evaluation.summary[label]
    metrics = {k: _pair(summary[k]) for k in EVAL_METRICS if k in summary}
    if label != "base":
        gain, gain_se = mean_se(paired_differences(evaluation.samples, label, "reward"))
        metrics["reward_gain"] = _pair((gain, gain_se))
        metrics["headroom_closed"] = _pair((gain / headroom, gain_se / abs(headroom)))
        metrics["silhouette_iou_gain"] = _pair(mean_se(paired_differences(evaluation.samples, label, "silhouette_iou"))) \
            if "silhouette_iou" in summary else _pair((math.nan, math.nan))
    return metrics


def over_seeds(values: list[float | None]) -> dict:
    """Mean ± standard error over training seeds (None: not measured)."""
    return _pair(mean_se([math.nan if v is None else v for v in values]))


def summarise(runs: list[PlannedRun], records: dict[str, dict], evaluation, ground_truth: float) -> dict:
    """Per run its evaluation points; per method the final points' metrics over seeds."""
    base_metrics = point_metrics(evaluation, "base", math.nan)
    headroom = ground_truth - base_metrics["reward"]["mean"]
    per_run = {}
    for record in records.values():
        points = [{"epoch": c["epoch"], "step": c["global_step"], "label": eval_label(record, c),
                   **point_metrics(evaluation, eval_label(record, c), headroom)} for c in record["checkpoints"]]
        per_run[record["name"]] = {**{k: record[k] for k in ("method", "seed", "wall_time_s", "resumed",
                                                             "mlflow_run_id")}, "points": points}
    methods = {}
    for method in dict.fromkeys(run.method for run in runs):
        finals = [r["points"][-1] for r in per_run.values() if r["method"] == method]
        methods[method] = {k: over_seeds([p.get(k, {}).get("mean") for p in finals])
                           for k in (*TABLE_COLUMNS, "reward", "silhouette_iou_gain", "dnc")}
        methods[method]["wall_time_s"] = over_seeds([r["wall_time_s"] for r in per_run.values() if r["method"] == method])
        # A resumed run's wall time is that of its last part only.
        methods[method]["resumed"] = any(r["resumed"] for r in per_run.values() if r["method"] == method)
        methods[method]["num_seeds"] = len(finals)
        methods[method]["final_step"] = finals[0]["step"]
    return {"base": base_metrics, "reward_ground_truth": ground_truth, "headroom": headroom,
            "runs": per_run, "methods": methods}


def _cell(value: dict, fmt: str) -> str:
    if value.get("mean") is None:
        return "–"
    text = fmt.format(value["mean"])
    if value.get("se") is None:
        return text
    # a percentage's error as a percentage; any other to two significant digits
    return f"{text} ± {(fmt if '%' in fmt else '{:.2g}').format(value['se']).lstrip('+')}"


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def markdown_table(summary: dict) -> str:
    """The per-method table (and the base model's row) in Markdown, with what it averages."""
    header = ["method", *(heading for heading, _ in TABLE_COLUMNS.values()), "wall time per run"]
    base = summary["base"]
    base_cells = [f"– (reward {base['reward']['mean']:.4g})", "–"]
    base_cells += [_cell(base[k], TABLE_COLUMNS[k][1]) for k in ("silhouette_iou", "color_accuracy", "diversity")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| base | " + " | ".join([*base_cells, "–", "–"]) + " |"]
    for method, values in summary["methods"].items():
        cells = [_cell(values[k], fmt) for k, (_, fmt) in TABLE_COLUMNS.items()]
        wall = _minutes(values["wall_time_s"]["mean"]) + (" (resumed: the last part only)" if values.get("resumed") else "")
        lines.append(f"| {method} | " + " | ".join([*cells, wall]) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(summary: dict) -> str:
    setting, ev = summary["setting"], summary["evaluation"]
    seeds = {m["num_seeds"] for m in summary["methods"].values()}
    return "\n".join([
        f"# Comparison {summary['experiment']}", "",
        f"{setting['description']}", "",
        markdown_table(summary),
        f"Held-out: {ev['num_prompts']} prompts x {len(ev['seeds'])} seeds, the same initial noise for every model. "
        f"Methods: the final checkpoints (step {', '.join(sorted({str(m['final_step']) for m in summary['methods'].values()}))}), "
        f"mean ± standard error over {'/'.join(map(str, sorted(seeds)))} training seeds; base: ± s.e. over prompts x seeds. "
        f"Reward gain: the held-out reward minus the base model's, paired by prompt and seed. Headroom closed: the gain "
        f"over the headroom {summary['headroom']:.4g} (ground truth {summary['reward_ground_truth']:.4g} from the same "
        f"views, minus the base model's {summary['base']['reward']['mean']:.4g}). KID to base: 0 = indistinguishable "
        f"from the base model's samples. Wall time: per run, training only.", "",
    ])


def training_curves(tracking_uri: str, summary: dict, key: str = "reward/mean") -> dict[str, list[tuple[int, float, float]]]:
    """Per method: [(step, mean, se over seeds)] of ``key``'s MLflow history, at the steps every seed logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    curves = {}
    for method in summary["methods"]:
        histories = [{int(m.step): m.value for m in client.get_metric_history(run["mlflow_run_id"], key)}
                     for run in summary["runs"].values() if run["method"] == method and run["mlflow_run_id"]]
        steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
        curves[method] = [(s, *mean_se([h[s] for h in histories])) for s in steps]
    return curves


def eval_curves(summary: dict, metric: str) -> dict[str, list[tuple[int, float, float]]]:
    """Per method: [(step, mean, se over seeds)] of a held-out metric, the base model's at step 0."""
    curves = {}
    base = summary["base"].get(metric, {}).get("mean")
    for method in summary["methods"]:
        runs = [r for r in summary["runs"].values() if r["method"] == method]
        steps = sorted({p["step"] for r in runs for p in r["points"]})
        points = [(0, base, math.nan)] if base is not None else []
        for step in steps:
            values = [p[metric]["mean"] for r in runs for p in r["points"]
                      if p["step"] == step and p.get(metric, {}).get("mean") is not None]
            if values:
                points.append((step, *mean_se(values)))
        curves[method] = points
    return curves


def plot_curves(summary: dict, tracking_uri: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    panels = [("training reward (reward/mean, MLflow)", training_curves(tracking_uri, summary)),
              ("held-out reward", eval_curves(summary, "reward")),
              ("held-out silhouette IoU", eval_curves(summary, "silhouette_iou")),
              ("held-out colour accuracy", eval_curves(summary, "color_accuracy")),
              ("held-out diversity", eval_curves(summary, "diversity")),
              ("KID to the base model (↓)", eval_curves(summary, "prior_kid"))]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels):
        for i, (method, points) in enumerate(curves.items()):
            if not points:
                continue
            steps, means, ses = zip(*points)
            ses = [0.0 if math.isnan(s) else s for s in ses]
            ax.errorbar(steps, means, yerr=ses, marker="o", markersize=3, capsize=3, label=method, color=f"C{i}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['experiment']}: mean ± s.e. over training seeds (step 0 of the held-out panels: the base model)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_pictures(evaluation, summary: dict, out: Path, tracking_uri: str) -> dict[str, str]:
    """``before_after.png`` (base, then each method's first seed, first view of each prompt) and
    ``report/``: ``r2d3ray eval``'s report of the base model and every final checkpoint."""
    from r2d3ray.eval.report import write_report
    from r2d3ray.render.pictures import save_grid_png

    finals = [r["points"][-1]["label"] for r in summary["runs"].values()]
    first_seed = {}
    for run in summary["runs"].values():
        first_seed.setdefault(run["method"], run["points"][-1]["label"])
    rows = [evaluation.pictures[label][:, 0] for label in ["base", *first_seed.values()]]  # (P, 3, H, W) each
    before_after = save_grid_png(rows, out / "before_after.png")
    keep = ["base", *finals]
    final_only = replace(evaluation, runs=[r for r in evaluation.runs if r.label in keep],
                         samples=[s for s in evaluation.samples if s["run"] in keep],
                         summary={k: v for k, v in evaluation.summary.items() if k in keep},
                         pictures={k: v for k, v in evaluation.pictures.items() if k in keep})
    index = write_report(final_only, out / "report", tracking_uri)
    return {"before_after": str(before_after), "report": str(index),
            "before_after_rows": ["base", *first_seed.values()]}


def log_to_runs(summary: dict, tracking_uri: str) -> None:
    """``eval/<metric>`` (and ``_se``) into each training run at its evaluated steps, the base model's at
    step 0; a run that has them already (a re-evaluation) is left as it is."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    for run in summary["runs"].values():
        if not run["mlflow_run_id"] or "eval/reward" in client.get_run(run["mlflow_run_id"]).data.metrics:
            continue
        metrics = []
        for step, values in [(0, summary["base"]), *((p["step"], p) for p in run["points"])]:
            for name in EVAL_METRICS:
                value = values.get(name, {})
                for suffix, number in (("", value.get("mean")), ("_se", value.get("se"))):
                    if number is not None:
                        metrics.append(Metric(f"eval/{name}{suffix}", float(number), now, step))
        client.log_batch(run["mlflow_run_id"], metrics=metrics)
        client.set_tag(run["mlflow_run_id"], "compare.experiment", summary["experiment"])


def describe_setting(base: R2D3Config, methods: list[str], seeds: int) -> dict:
    t, s = base.training, base.sampling
    terms = " + ".join(x.name if x.weight == 1 else f"{x.weight:g}·{x.name}" for x in base.rewards.terms)
    description = (f"{', '.join(methods)} x {seeds} seeds on the {base.model.kind} generator, reward {terms}: "
                   f"{t.epochs} trained epochs of {base.samples_per_epoch()} trajectories per worker x "
                   f"{t.num_workers} workers ({s.num_steps} sampling steps, CFG {s.guidance_scale:g}), "
                   f"{base.optimizer_steps_per_epoch()} optimizer step(s) per epoch, lr {t.lr:g}.")
    return {"description": description, "methods": methods, "seeds": seeds, "epochs": t.epochs,
            "trajectories_per_epoch_per_worker": base.samples_per_epoch(), "num_workers": t.num_workers,
            "optimizer_steps_per_epoch": base.optimizer_steps_per_epoch(), "sampling_steps": s.num_steps,
            "reward": terms}


def run_compare(config: str | None = None, overrides: list[str] | None = None, methods: str = ",".join(METHODS),
                seeds: int = DEFAULT_SEEDS, epochs: int | None = None, out: str | None = None,
                experiment: str | None = None) -> dict:
    """Train, evaluate and report (see the module docstring); returns the summary."""
    from r2d3ray.demo import ground_truth_reward
    from r2d3ray.models.world import split_prompts
    from r2d3ray.tracking import resolve_tracking_uri

    started = time.monotonic()
    chosen = parse_methods(methods)
    base = base_config(config, list(overrides or []), epochs)
    out_dir = Path(out) if out else Path(base.output_dir) / "compare"
    date, experiment = open_plan(out_dir, base, experiment)
    runs = plan_runs(base, chosen, seeds, date, experiment)
    tracking_uri = resolve_tracking_uri(base.tracking.tracking_uri, base.output_dir)
    setting = describe_setting(base, chosen, seeds)
    print(f"[compare] {setting['description']}\n[compare] MLflow experiment {experiment!r} in {tracking_uri}; "
          f"results in {out_dir}", flush=True)

    check_runs(runs)
    save_plan(out_dir, base, date, experiment)
    records = train_runs(runs, out_dir)
    prompts = split_prompts("held_out")
    summary_file = out_dir / "compare_summary.json"
    evaluated = sorted(f"{eval_label(r, c)}={c['path']}" for r in records.values() for c in r["checkpoints"])
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if previous and previous["evaluation"]["models"] == evaluated:
        print("[compare] every checkpoint was evaluated earlier; writing the table and figures again", flush=True)
        summary = previous
    else:
        evaluation = evaluate_runs(base, records, prompts)
        ground_truth = float(ground_truth_reward(base, prompts).mean())
        summary = summarise(runs, records, evaluation, ground_truth)
        summary.update({"experiment": experiment, "tracking_uri": tracking_uri, "date": date, "setting": setting,
                        "evaluation": {"models": evaluated, "num_prompts": len(prompts), "seeds": EVAL_SEEDS,
                                       "feature_space": evaluation.feature_space, "notes": evaluation.notes}})
        summary["files"] = write_pictures(evaluation, summary, out_dir, tracking_uri)
        log_to_runs(summary, tracking_uri)
    summary["files"].update({"summary": str(summary_file), "table": str(out_dir / "compare.md"),
                             "curves": str(plot_curves(summary, tracking_uri, out_dir / "compare_curves.png"))})
    (out_dir / "compare.md").write_text(markdown_report(summary))
    summary_file.write_text(json.dumps(summary, indent=1))

    print("\n" + "=" * 78)
    print(f"r2d3ray compare: {summary['setting']['description']} ({time.monotonic() - started:.0f} s)\n")
    print(markdown_table(summary))
    files = summary["files"]
    print(f"table:        {files['table']}\nsummary:      {files['summary']}\ncurves:       {files['curves']}")
    print(f"before/after: {files['before_after']} (rows: {', '.join(files['before_after_rows'])})")
    print(f"report:       {files['report']}")
    print(f"MLflow:       experiment {experiment!r} in {tracking_uri}\n"
          f"  open the UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")
    return summary
