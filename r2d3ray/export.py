"""`r2d3ray export`: a run's LoRA in the layouts other tools load, the base model with it merged, a model card.

    r2d3ray export --run RUN_OR_CHECKPOINT --out DIR [--config F] [--set k=v ...] [--eval REPORT ...]

``--run`` is resolved as `infer` and `eval` resolve ``--lora`` (``infer.resolve_lora``): a run directory
stands for its newest checkpoint, a checkpoint for its ``lora/`` (the deployed adapter: DiffusionNFT's
EMA when it keeps one), or a bare LoRA directory. The run's config comes from the checkpoint's
``state.json`` unless ``--config`` is given (needed for a bare LoRA directory). DIR must be new or
empty; it is written as a whole (into ``DIR.partial``, renamed at the end)::

    README.md     the model card: base model, algorithm, rewards, LoRA, training state, evaluation
                  numbers, how to load each part, the run's config
    config.yaml   the run's config, resolved
    lora/         diffusers' layout: pytorch_lora_weights.safetensors ("transformer." keys) and
                  adapter_config.json, what `--lora` takes and ``load_lora_adapter(dir, prefix="transformer")`` loads
    peft/         peft's layout: adapter_model.safetensors and adapter_config.json, what
                  ``PeftModel.from_pretrained(transformer, DIR/peft)`` loads onto the bare base transformer
    merged/       the base model with the LoRA merged into its transformer, in the base model's own
                  layout: `model.path: DIR/merged` loads it as a base model (no LoRA) and samples
                  what base + LoRA samples. transformer/ is written by the transformer's own
                  save_pretrained, in the dtype the base stores; every other file of the base model
                  (VAE, scheduler, prompt encoder or prompt cache) is copied, so the export stands
                  alone and writing into it never touches the base model

The merge is peft's: ``PeftModel.from_pretrained`` of the written peft/ onto the base transformer,
then ``merge_and_unload``, so the merged model is built from the exported adapter itself.

Evaluation numbers in the card come from `r2d3ray eval` reports that list this LoRA: every
``<output_dir>/eval/*/metrics.json``, and the reports or `make demo` summaries (``demo_summary.json``)
given with ``--eval``. Without one the card says that no evaluation was found.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
import yaml
from peft import PeftModel

from r2d3ray.config import R2D3Config, build_config, load_config
from r2d3ray.errors import UserError
from r2d3ray.infer import resolve_lora
from r2d3ray.models.loading import load_generator, missing_model_files, model_directory
from r2d3ray.models.lora import load_lora, save_lora, save_peft_adapter

# Both generators keep their denoiser in the model directory's transformer/ (tiny.py, diffsplat.py).
TRANSFORMER_DIR = "transformer"
CARD_NAME = "README.md"
ALGORITHM_NAMES = {
    "nabla": "Nabla-R2D3 (residual ∇-GFlowNet with reward gradients)",
    "nft": "DiffusionNFT (negative-aware fine-tuning on the forward process)",
    "reward_backprop": "reward backpropagation (ReFL / DRaFT-K)",
}
MODEL_NAMES = {"tiny": "the tiny splat prior", "diffsplat": "DiffSplat (PixArt-Σ multi-view transformer + GS-VAE)"}


class ExportError(UserError, ValueError):
    """A run, checkpoint, report or output directory that cannot be exported; the message says what to pass."""


@dataclass
class EvalNumbers:
    """Numbers about the exported LoRA: ``rows`` of (metric, {column: "mean ± se"}) under ``columns``."""

    source: Path
    description: str
    columns: list[str]
    rows: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@dataclass
class Export:
    """What ``export_run`` wrote and from what."""

    out: Path
    lora: Path  # the exported LoRA directory (source)
    checkpoint: Path | None
    evaluations: list[EvalNumbers]

    @property
    def card(self) -> Path:
        return self.out / CARD_NAME


def resolve_run(path: str | os.PathLike) -> tuple[Path, Path | None, dict]:
    """(the LoRA directory, the checkpoint holding ``state.json`` or None, that state) of ``path``."""
    try:
        lora = resolve_lora(path)
    except FileNotFoundError as err:
        raise ExportError(f"--run: {err}") from None
    # The checkpoint beside the LoRA, as `r2d3ray eval` links a LoRA to its training run.
    checkpoint = next((d for d in (lora, lora.parent) if (d / "state.json").is_file()), None)
    state = json.loads((checkpoint / "state.json").read_text()) if checkpoint else {}
    return lora, checkpoint, state


def run_config(state: dict, config: str | os.PathLike | None, overrides: list[str]) -> R2D3Config:
    """``--config`` (with ``--set``) when given, else the config saved in the checkpoint's ``state.json``."""
    if config is not None:
        return load_config(config, overrides)
    if "config" not in state:
        raise ExportError("--run names a LoRA directory without a training checkpoint's state.json, so the run's "
                          "config (its base model, algorithm and rewards) is unknown; pass it with --config FILE")
    return build_config(state["config"], overrides)


def _same_path(recorded: str | None, path: Path) -> bool:
    return bool(recorded) and Path(recorded).resolve() == path.resolve()


def _mean_se(value: dict | None) -> str:
    if not value or value.get("mean") is None:
        return "–"
    return f"{value['mean']:.4g}" + (f" ± {value['se']:.2g}" if value.get("se") is not None else "")


def read_evaluation(path: str | os.PathLike, lora: Path, explicit: bool) -> EvalNumbers | None:
    """The numbers of ``lora`` in an `r2d3ray eval` report (its directory or metrics.json) or, given
    explicitly, a `make demo` summary. A report that does not list ``lora`` gives None, or with
    ``explicit`` an ExportError naming the LoRAs it does list."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ExportError(f"--eval {str(path)!r}: not found; give an `r2d3ray eval` report directory (holding "
                          "metrics.json), its metrics.json, or a `make demo` demo_summary.json")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"--eval {str(file)!r} is not valid JSON ({err})") from None
    if isinstance(report, dict) and "runs" in report and "summary" in report:
        run = next((r for r in report["runs"] if _same_path(r.get("lora"), lora)), None)
        if run is None:
            if not explicit:
                return None
            listed = [r.get("lora") for r in report["runs"] if r.get("lora")]
            raise ExportError(f"--eval {str(file)!r} does not evaluate the exported LoRA {lora}; it lists {listed}")
        columns = [label for label in ("base", run["label"]) if label in report["summary"]]
        metrics = list(dict.fromkeys(m for label in columns for m in report["summary"][label]))
        rows = [(metric, {label: _mean_se(report["summary"][label].get(metric)) for label in columns})
                for metric in metrics]
        description = (f"`r2d3ray eval` report `{file.parent}`: {len(report.get('prompts', []))} prompts x "
                       f"{len(report.get('seeds', []))} seeds, mean ± standard error; this LoRA is `{run['label']}`")
        return EvalNumbers(file, description, columns, rows)
    if explicit and isinstance(report, dict) and report and all(isinstance(v, (int, float)) for v in report.values()):
        # demo_summary.json names no run: it is the user who says it belongs to this one.
        rows = [(key, {"value": f"{value:.4g}"}) for key, value in report.items()]
        return EvalNumbers(file, f"`make demo` summary `{file}` (given with --eval)", ["value"], rows)
    raise ExportError(f"--eval {str(file)!r} is neither an `r2d3ray eval` metrics.json (with 'runs' and 'summary') "
                      "nor a `make demo` demo_summary.json (metric names to numbers)")


def find_evaluations(cfg: R2D3Config, lora: Path, reports: list[str | os.PathLike]) -> list[EvalNumbers]:
    """``--eval`` reports first, then every `r2d3ray eval` report under ``<output_dir>/eval`` that lists ``lora``."""
    found = [read_evaluation(report, lora, explicit=True) for report in reports]
    seen = {e.source.resolve() for e in found}
    for file in sorted((Path(cfg.output_dir) / "eval").glob("*/metrics.json")):
        if file.resolve() not in seen and (evaluation := read_evaluation(file, lora, explicit=False)) is not None:
            found.append(evaluation)
    return found


def _stored_dtype(transformer_dir: Path) -> torch.dtype:
    """The dtype the base model's transformer weights are stored in (the merged ones are saved in it)."""
    files = sorted(transformer_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no *.safetensors weights in {transformer_dir}; the base model's transformer must be "
                          "stored as safetensors (as `r2d3ray pretrain` and `r2d3ray prepare-diffsplat` write it)")
    with safetensors.safe_open(str(files[0]), framework="pt") as weights:
        return weights.get_tensor(next(iter(weights.keys()))).dtype


def copy_base_components(base: Path, merged: Path) -> list[str]:
    """Everything of the base model directory but its transformer (and its README, which describes the
    base) copied into ``merged``; returns the names."""
    names = []
    for entry in sorted(base.iterdir()):
        if entry.name in (TRANSFORMER_DIR, CARD_NAME) or entry.name.endswith(".partial"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, merged / entry.name)
        else:
            shutil.copy2(entry, merged / entry.name)
        names.append(entry.name)
    return names


def _prepare_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {str(out)!r} already exists and is not an empty directory; choose a new "
                          "directory (export never writes over earlier files)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that was stopped
    partial.mkdir(parents=True)
    return partial


def export_run(run: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None,
               overrides: list[str] | None = None, reports: list[str | os.PathLike] = ()) -> Export:
    """Write ``out`` as the module docstring describes, from a run, checkpoint or LoRA directory ``run``."""
    lora, checkpoint, state = resolve_run(run)
    cfg = run_config(state, config, list(overrides or []))
    missing = missing_model_files(cfg)
    if missing:
        raise ExportError(f"the run's base model is incomplete: {missing[0]} not found. Point model.path at the "
                          "base model the run was trained on (--set model.path=DIR) or pass --config")
    evaluations = find_evaluations(cfg, lora, list(reports))
    out = Path(out)
    partial = _prepare_out(out)
    base = model_directory(cfg)
    try:
        # Merge in float32 on the CPU whatever the run used; the result is cast to the stored dtype.
        float32 = cfg.model.model_copy(update={"dtype": "float32", "gradient_checkpointing": False})
        generator = load_generator(cfg.model_copy(update={"model": float32}), "cpu")
        denoiser = generator.denoiser
        load_lora(denoiser, lora, adapter="policy")  # also reads Nabla-R2D3's "unet." files
        lora_config = denoiser.peft_config["policy"]
        num_lora_parameters = sum(p.numel() for n, p in denoiser.named_parameters() if ".policy." in n)
        save_lora(denoiser, partial / "lora", adapter="policy")
        save_peft_adapter(denoiser, partial / "peft", adapter="policy",
                          base_model_name_or_path=str((base / TRANSFORMER_DIR).resolve()))

        denoiser.unload_lora()  # the bare base transformer again
        merged = PeftModel.from_pretrained(denoiser, str(partial / "peft")).merge_and_unload()
        stored_dtype = _stored_dtype(base / TRANSFORMER_DIR)
        if stored_dtype != torch.float32:
            merged.to(stored_dtype)
        merged.save_pretrained(str(partial / "merged" / TRANSFORMER_DIR))
        copied = copy_base_components(base, partial / "merged")

        (partial / "config.yaml").write_text(cfg.to_yaml())
        card = model_card(cfg, lora, checkpoint, state, lora_config, num_lora_parameters, evaluations, base, copied, out)
        (partial / CARD_NAME).write_text(card)
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Export(out, lora, checkpoint, evaluations)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def _reward_lines(cfg: R2D3Config) -> list[str]:
    """One line per reward term, with the reward model its deployment runs when the app config is readable."""
    from r2d3ray.config import load_reward_app_config

    try:
        deployments = {d.name: d for d in load_reward_app_config(cfg.rewards.app_config).deployments}
    except (UserError, ValueError, OSError):
        deployments = {}
    lines = []
    for term in cfg.rewards.terms:
        deployment = deployments.get(term.name)
        what = f" (reward `{deployment.reward}`" + (f", {deployment.kwargs}" if deployment.kwargs else "") + ")" \
            if deployment else ""
        lines.append(f"- `{term.name}`, weight {term.weight:g}{what}")
    return lines + [f"- views aggregated by `{cfg.rewards.aggregate}`; reward app config `{cfg.rewards.app_config}`"]


def model_card(cfg: R2D3Config, lora: Path, checkpoint: Path | None, state: dict, lora_config, num_lora_parameters: int,
               evaluations: list[EvalNumbers], base: Path, copied: list[str], out: Path) -> str:
    """The README.md of an export (Markdown with a YAML header, as model cards are written)."""
    algorithm = cfg.algorithm.name
    settings = getattr(cfg.algorithm, algorithm).model_dump(mode="json")
    terms = " + ".join(t.name if t.weight == 1 else f"{t.weight:g}·{t.name}" for t in cfg.rewards.terms)
    header = {"library_name": "diffusers", "tags": ["r2d3ray", "lora", "gaussian-splatting", algorithm],
              "base_model_path": str(base.resolve())}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {cfg.name}: {MODEL_NAMES[cfg.model.kind]} aligned with {terms}", "",
             f"A LoRA on the transformer of {MODEL_NAMES[cfg.model.kind]}, trained by r2d3ray with "
             f"{ALGORITHM_NAMES[algorithm]} on the reward {terms}.", "",
             "## Base model", "",
             f"- kind `{cfg.model.kind}`, directory `{base.resolve()}`",
             f"- trained with weights in `{cfg.model.dtype}`", "",
             "## Algorithm", "", f"{ALGORITHM_NAMES[algorithm]}; `algorithm.name: {algorithm}` with the settings", "",
             *[f"- `{key}`: `{value}`" for key, value in settings.items()], "",
             "## Rewards", "", *_reward_lines(cfg), "",
             "## LoRA", "",
             f"- rank {lora_config.r}, alpha {lora_config.lora_alpha:g}, {num_lora_parameters:,} parameters",
             f"- on the transformer's `{'`, `'.join(sorted(lora_config.target_modules))}` layers",
             f"- exported from `{lora.resolve()}`"]
    if checkpoint is not None and (checkpoint / "lora_policy").is_dir():
        lines.append("- this is the EMA of the trained policy (what `eval` and `infer` load); the policy itself is "
                     f"`{checkpoint / 'lora_policy'}`")
    lines += ["", "## Training", ""]
    if checkpoint is None:
        lines.append("Exported from a bare LoRA directory: no checkpoint state (epochs, optimizer steps) is known.")
    else:
        lines += [f"- checkpoint `{checkpoint.resolve()}`",
                  f"- {state.get('epoch', '?')} trained epochs, {state.get('global_step', '?')} optimizer steps "
                  f"(configured: {cfg.training.epochs} epochs, lr {cfg.training.lr:g})",
                  f"- MLflow run id `{state.get('mlflow_run_id') or 'none'}` (experiment `{cfg.tracking.experiment}`)"]
    lines += ["", "## Evaluation", ""]
    if not evaluations:
        lines += [f"No evaluation of this LoRA was found: no `r2d3ray eval` report under `{Path(cfg.output_dir) / 'eval'}` "
                  "lists it, and none was given with `--eval`. Measure it against the base model with",
                  "", "```bash", f"r2d3ray eval --config {out}/config.yaml --runs base,{lora} --prompts PROMPTS",
                  "```", "", "and export again (or pass the report with `--eval`)."]
    for evaluation in evaluations:
        lines += [evaluation.description + ":", "",
                  *_table(["metric", *evaluation.columns],
                          [[metric, *[values.get(c, "–") for c in evaluation.columns]] for metric, values in evaluation.rows]),
                  ""]
    lines += ["", "## Files and how to load them", "",
              *_table(["folder", "what", "load with"], [
                  ["`lora/`", "diffusers' LoRA layout: `pytorch_lora_weights.safetensors` (keys `transformer.…`) "
                   "and `adapter_config.json`",
                   f"`r2d3ray sample --config {out}/config.yaml --lora {out}/lora ...`; "
                   "`transformer.load_lora_adapter(dir, prefix=\"transformer\")`"],
                  ["`peft/`", "peft's layout: `adapter_model.safetensors` (keys `base_model.model.…`) and "
                   "`adapter_config.json`", f"`PeftModel.from_pretrained(transformer, \"{out}/peft\")`"],
                  ["`merged/`", "the base model with the LoRA merged into `transformer/`, in the base model's "
                   f"layout; {', '.join(f'`{n}`' for n in copied)} are copies of the base model's files",
                   f"`r2d3ray sample --config {out}/config.yaml --set model.path={out}/merged ...` (no `--lora`)"],
              ]),
              "", "The merged model samples the same splats as the base model with the LoRA (same seed; float "
              "rounding apart).", "",
              "## The run's config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
