"""Config loading, overrides and validation messages (issue 2)."""

from pathlib import Path

import pytest
import yaml

from r2d3ray.config import ConfigError, build_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if not p.name.startswith(("rewards", "tiny_prior"))]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_validates(path):
    cfg = load_config(path)
    assert cfg.name


def test_override_changes_value_and_parses_yaml_types():
    cfg = load_config(None, ["training.lr=1e-4", "render.random_view=false", "rewards.terms=[{name: dnc, weight: 0.5}]"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.render.random_view is False
    assert cfg.rewards.terms[0].name == "dnc" and cfg.rewards.terms[0].weight == 0.5


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError) as err:
        build_config({"training": {"lrr": 1e-4}})
    msg = str(err.value)
    assert "training.lrr" in msg and "did you mean 'training.lr'" in msg


def test_unknown_section_suggests_section():
    with pytest.raises(ConfigError, match="did you mean 'sampling'"):
        load_config(None, ["samplng.num_steps=10"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sampling.num_steps=many"])
    assert "sampling.num_steps = 'many'" in str(err.value) and "integer" in str(err.value)


def test_out_of_range_names_bound():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm.nabla.timestep_fraction=1.5"])
    assert "algorithm.nabla.timestep_fraction = 1.5" in str(err.value)
    assert "less than or equal to 1" in str(err.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="'nabla', 'nft' or 'reward_backprop'"):
        load_config(None, ["algorithm.name=ppo"])


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        load_config(None, ["training.offload_params=true", "training.zero_stage=2"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["training.lr=2e-4", "name=abc"])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert yaml.safe_load(cfg.to_yaml())["training"]["lr"] == pytest.approx(2e-4)
    assert cfg.flat()["training.lr"] == pytest.approx(2e-4)
