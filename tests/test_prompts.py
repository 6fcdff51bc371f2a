"""Prompt sets (.txt / Parquet), reward caches and the reward-threshold filter."""

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2d3ray.config import build_config
from r2d3ray.eval.prompts import (
    PROMPT_SCHEMA,
    filter_by_reward,
    read_prompts,
    training_prompts,
    write_prompts,
    write_reward_cache,
)
from r2d3ray.models.world import split_prompts


def cache_rows(rewards: dict[str, list[float]], name="normal"):
    now = datetime.now(timezone.utc)
    return [{"prompt": p, "seed": seed, "reward": r, "reward_name": name, "model": "tiny prior", "created": now}
            for p, values in rewards.items() for seed, r in enumerate(values)]


def test_text_prompts_skip_blanks_and_comments_and_keep_order(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# held out\na red cube\n\n  a blue sphere  \na red cube\n")
    assert read_prompts(path) == ["a red cube", "a blue sphere", "a red cube"]


def test_parquet_prompt_set_round_trip_and_split(tmp_path):
    path = write_prompts(tmp_path / "set.parquet", ["a red cube", "a blue sphere"], split="held_out", source="world")
    table = pq.read_table(path)
    assert table.schema.equals(PROMPT_SCHEMA)
    assert table.column("source").to_pylist() == ["world", "world"]
    assert read_prompts(path) == ["a red cube", "a blue sphere"]
    assert read_prompts(path, split="held_out") == ["a red cube", "a blue sphere"]
    with pytest.raises(ValueError, match="no prompts in split 'train'"):
        read_prompts(path, split="train")


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")
    pq.write_table(pa.table({"text": ["a red cube"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]"):
        read_prompts(tmp_path / "wrong.parquet")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_prompts(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match="needs a Parquet prompt set"):
        read_prompts(tmp_path / "empty.txt", split="train")
    with pytest.raises(ValueError, match="use a .parquet name"):
        write_prompts(tmp_path / "set.txt", ["a red cube"])


def test_filter_keeps_prompts_whose_mean_reward_is_above_the_threshold(tmp_path):
    cache = write_reward_cache(tmp_path / "r.parquet", cache_rows({
        "a red cube": [0.9, 0.8],  # mean 0.85 > 0.849
        "a blue sphere": [0.9, 0.7],  # mean 0.8
        "a green cone": [0.849],  # equal is not above
    }))
    prompts = ["a green cone", "a red cube", "a blue sphere", "a red cube"]
    assert filter_by_reward(prompts, cache, 0.849) == ["a red cube", "a red cube"]
    assert filter_by_reward(prompts, cache, 0.5) == prompts
    with pytest.warns(RuntimeWarning, match="1 of 2 prompts have no cached 'normal' reward"):
        assert filter_by_reward(["a gray torus", "a red cube"], cache, 0.5) == ["a red cube"]
    with pytest.raises(ValueError, match=r"keeps no prompt \(cached means range 0.8 .. 0.85\)"):
        filter_by_reward(prompts, cache, 0.9)


def test_filter_needs_a_reward_name_when_the_cache_has_several(tmp_path):
    rows = cache_rows({"a red cube": [0.9]}, "normal") + cache_rows({"a red cube": [0.1]}, "dnc")
    cache = write_reward_cache(tmp_path / "r.parquet", rows)
    with pytest.raises(ValueError, match=r"holds rewards \['dnc', 'normal'\]"):
        filter_by_reward(["a red cube"], cache, 0.5)
    assert filter_by_reward(["a red cube"], cache, 0.5, reward_name="normal") == ["a red cube"]
    with pytest.raises(ValueError, match="keeps no prompt"):
        filter_by_reward(["a red cube"], cache, 0.5, reward_name="dnc")
    with pytest.raises(ValueError, match="has no reward 'hps'"):
        filter_by_reward(["a red cube"], cache, 0.5, reward_name="hps")
    with pytest.raises(FileNotFoundError, match="precompute-rewards"):
        filter_by_reward(["a red cube"], tmp_path / "missing.parquet", 0.5)


def test_training_prompts_apply_the_config(tmp_path):
    assert training_prompts(build_config()) == split_prompts("train")
    (tmp_path / "p.txt").write_text("a red cube\na blue sphere\n")
    cache = write_reward_cache(tmp_path / "r.parquet", cache_rows({"a red cube": [0.9], "a blue sphere": [0.2]}))
    cfg = build_config(overrides=[f"prompts.file={tmp_path / 'p.txt'}"])
    assert training_prompts(cfg) == ["a red cube", "a blue sphere"]
    cfg = build_config(overrides=[f"prompts.file={tmp_path / 'p.txt'}", f"prompts.reward_file={cache}",
                                  "prompts.reward_threshold=0.5"])
    assert training_prompts(cfg) == ["a red cube"]
    with pytest.raises(ValueError, match="prompts.reward_file is empty"):
        training_prompts(build_config(overrides=["prompts.reward_threshold=0.5"]))
    with pytest.raises(ValueError, match="prompts.reward_threshold is not set"):
        training_prompts(build_config(overrides=[f"prompts.reward_file={cache}"]))
    with pytest.raises(ValueError, match="needs a prompt file"):
        training_prompts(build_config(overrides=["model.kind=diffsplat"]))


def test_committed_held_out_prompt_file_is_the_worlds_held_out_split():
    # configs/prompts/tiny_held_out.txt is what the README's `r2d3ray eval` walkthrough reads
    assert read_prompts("configs/prompts/tiny_held_out.txt") == split_prompts("held_out")
