"""Prompt sets and reward caches on disk, and the training prompts a run config selects.

Prompt sets are text files (one prompt per line; blank lines and lines starting with ``#`` are
skipped) or Parquet files with this schema (``PROMPT_SCHEMA``):

    prompt  string  not null   the text given to the generator
    split   string             e.g. "train" / "held_out" (empty when unknown)
    source  string             where the prompt comes from, e.g. "world", "G-Objaverse" (may be empty)

Reward caches (``REWARD_CACHE_SCHEMA``, written by ``r2d3ray precompute-rewards``) hold one row per
prompt x seed x reward term, scored on the base model:

    prompt       string     not null
    seed         int64      not null   sampling seed (the batch noise of ``infer.generate``)
    reward       float64    not null   that term's value, mean over the rendered views
    reward_name  string     not null   the run config's reward term (deployment) name, e.g. "normal"
    model        string     not null   the model scored: model.path, or "tiny prior" for the committed one
    created      timestamp[us, UTC]     when the row was written

``filter_by_reward`` keeps the prompts whose mean cached reward over seeds is above a threshold,
as Nabla-R2D3 does for its normal reward (the reference's ``is_apply_reward_threshold`` /
``reward_dir`` / ``reward_threshold``: prompts whose base-model normal reward is > 0.849).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PROMPT_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("source", pa.string()),
])
REWARD_CACHE_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),
    pa.field("reward_name", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("created", pa.timestamp("us", tz="UTC")),
])


def _read_table(path: Path, what: str, required: list[str]) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{what} {str(path)!r} is not a readable Parquet file ({err})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} {str(path)!r} lacks the column(s) {missing}; it has {table.column_names} "
                         f"(see r2d3ray/eval/prompts.py for the schema)")
    for column in required:
        if table.column(column).null_count:
            raise ValueError(f"{what} {str(path)!r}: column {column!r} has {table.column(column).null_count} empty values")
    return table


def read_prompts(path: str | Path, split: str | None = None) -> list[str]:
    """The prompts of a ``.txt`` file or a ``.parquet`` prompt set, in file order (duplicates kept).

    ``split`` keeps only the Parquet rows of that split. Raises FileNotFoundError for a missing file
    and ValueError for an empty one or a Parquet file without a ``prompt`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; give a text file with one prompt "
                                "per line or a Parquet file with a 'prompt' column")
    if path.suffix == ".parquet":
        table = _read_table(path, "prompt file", ["prompt"])
        if split is not None:
            if "split" not in table.column_names:
                raise ValueError(f"prompt file {str(path)!r} has no 'split' column; cannot select split={split!r}")
            table = table.filter(pc.equal(table.column("split"), split))
        prompts = [p.strip() for p in table.column("prompt").to_pylist() if p.strip()]
    else:
        if split is not None:
            raise ValueError(f"split={split!r} needs a Parquet prompt set; {str(path)!r} is a text file")
        lines = path.read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        where = f" in split {split!r}" if split is not None else ""
        raise ValueError(f"prompt file {str(path)!r} has no prompts{where}; write one prompt per line "
                         "(or one per row of the 'prompt' column)")
    return prompts


def write_prompts(path: str | Path, prompts: list[str], split: str = "", source: str = "") -> Path:
    """Write a Parquet prompt set (``PROMPT_SCHEMA``); every row gets the same ``split`` and ``source``."""
    path = Path(path)
    if path.suffix != ".parquet":
        raise ValueError(f"path {str(path)!r}: prompt sets are written as Parquet; use a .parquet name")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty strings")
    table = pa.table({"prompt": prompts, "split": [split] * len(prompts), "source": [source] * len(prompts)},
                     schema=PROMPT_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_reward_cache(path: str | Path, rows: list[dict]) -> Path:
    """Write reward-cache rows (dicts with the ``REWARD_CACHE_SCHEMA`` columns) as Parquet."""
    path = Path(path)
    if path.suffix != ".parquet":
        raise ValueError(f"--out {str(path)!r}: reward caches are written as Parquet; use a .parquet name")
    table = pa.Table.from_pylist(rows, schema=REWARD_CACHE_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_reward_cache(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward cache {str(path)!r} does not exist; write one with "
                                "`r2d3ray precompute-rewards --config F --prompts FILE --out FILE.parquet`")
    return _read_table(path, "reward cache", ["prompt", "seed", "reward", "reward_name"])


def filter_by_reward(prompts: list[str], reward_parquet: str | Path, threshold: float,
                     reward_name: str | None = None) -> list[str]:
    """The prompts whose mean cached reward (over seeds) is > ``threshold``, in their given order.

    ``reward_name`` picks the reward term when the cache holds several (None: the cache must hold
    exactly one). Prompts absent from the cache are dropped with a warning; a filter that keeps
    nothing is a ValueError stating the cached range.
    """
    table = read_reward_cache(reward_parquet)
    names = sorted(set(table.column("reward_name").to_pylist()))
    if reward_name is None:
        if len(names) != 1:
            raise ValueError(f"reward cache {str(reward_parquet)!r} holds rewards {names}; name the one to "
                             "filter on (reward_name), or precompute with a single reward term")
        reward_name = names[0]
    elif reward_name not in names:
        raise ValueError(f"reward cache {str(reward_parquet)!r} has no reward {reward_name!r}; it holds {names}")
    totals: dict[str, list[float]] = {}
    for prompt, name, reward in zip(*(table.column(c).to_pylist() for c in ("prompt", "reward_name", "reward"))):
        if name == reward_name:
            totals.setdefault(prompt, []).append(reward)
    mean = {p: sum(v) / len(v) for p, v in totals.items()}
    missing = sorted({p for p in prompts if p not in mean})
    if missing:
        warnings.warn(f"{len(missing)} of {len(set(prompts))} prompts have no cached {reward_name!r} reward in "
                      f"{str(reward_parquet)!r} and are dropped (e.g. {missing[0]!r})", RuntimeWarning, stacklevel=2)
    kept = [p for p in prompts if mean.get(p, float("-inf")) > threshold]
    if not kept:
        known = [mean[p] for p in prompts if p in mean]
        span = f"cached means range {min(known):.4g} .. {max(known):.4g}" if known else "none of the prompts is cached"
        raise ValueError(f"reward threshold {threshold!r} on {reward_name!r} keeps no prompt ({span}); lower it")
    return kept


def training_prompts(cfg) -> list[str]:
    """The prompt pool a run trains on: ``cfg.prompts.file`` (default: the tiny world's train split),
    filtered by ``cfg.prompts.reward_file`` / ``reward_threshold`` when a threshold is set."""
    p = cfg.prompts
    if p.file:
        prompts = read_prompts(p.file)
    elif cfg.model.kind == "tiny":
        from r2d3ray.models.world import split_prompts

        prompts = split_prompts("train")
    else:
        raise ValueError(f"prompts.file is empty; a {cfg.model.kind} run needs a prompt file (.txt or .parquet)")
    if p.reward_threshold is None:
        if p.reward_file:
            raise ValueError(f"prompts.reward_file is {p.reward_file!r} but prompts.reward_threshold is not set; "
                             "set both to filter prompts by their precomputed reward, or neither")
        return prompts
    if not p.reward_file:
        raise ValueError(f"prompts.reward_threshold is {p.reward_threshold!r} but prompts.reward_file is empty; "
                         "point it at a cache written by `r2d3ray precompute-rewards`")
    return filter_by_reward(prompts, p.reward_file, p.reward_threshold)
