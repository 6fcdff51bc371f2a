"""Config loading, overrides and validation messages (issue 2)."""

from pathlib import Path

import pytest
import yaml

from r2d3ray.config import ConfigError, build_config, load_config, load_reward_app_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if not p.name.startswith(("rewards", "tiny_prior", "tiny_critic")) and not p.stem.endswith("_base")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_validates_with_its_reward_app(path):
    cfg = load_config(path)
    app = load_reward_app_config(ROOT / cfg.rewards.app_config)
    assert cfg.name == path.stem or path.name == "toy.yaml"
    assert cfg.rewards.app_name == app.app_name
    served = {d.name for d in app.deployments}
    assert {t.name for t in cfg.rewards.terms} <= served
    assert cfg.samples_per_epoch() % cfg.training.gradient_accumulation_steps == 0


# The optimizer steps each DiffSplat config's header comment states (per epoch, trained epochs).
DIFFSPLAT_STEPS = {"hps": (2, 100), "aesthetic": (4, 100), "normal": (2, 100),
                   "hps_nft": (1, 100), "aesthetic_nft": (1, 100), "normal_nft": (1, 100)}


@pytest.mark.parametrize("run", sorted(DIFFSPLAT_STEPS))
def test_diffsplat_configs_state_their_optimizer_steps(run):
    path = ROOT / "configs" / f"diffsplat_pas_{run}.yaml"
    cfg = load_config(path)
    per_epoch, epochs = DIFFSPLAT_STEPS[run]
    assert (cfg.optimizer_steps_per_epoch(), cfg.training.epochs) == (per_epoch, epochs)
    header = path.read_text().split("\nbase:")[0]
    assert f"= {per_epoch} per epoch, {per_epoch * epochs} in {epochs} epochs" in " ".join(header.replace("#", " ").split())
    assert cfg.training.micro_batch_size == 1 and cfg.prompts.file and cfg.model.kind == "diffsplat"


def test_base_file_is_merged_under_the_run_config(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntraining: {lr: 0.5, epochs: 7}\nrewards: {terms: [{name: a}, {name: b}]}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nname: run\ntraining: {lr: 0.25}\nrewards: {terms: [{name: c}]}\n")
    cfg = load_config(tmp_path / "run.yaml", ["training.epochs=3"])
    assert (cfg.name, cfg.training.lr, cfg.training.epochs) == ("run", 0.25, 3)
    assert [t.name for t in cfg.rewards.terms] == ["c"]  # a list replaces the base's


def test_base_file_cycle_and_missing_base_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*does not exist"):
        load_config(tmp_path / "c.yaml")


def test_accumulation_counts_trajectories_and_must_fit_the_epoch():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        build_config({"training": {"gradient_accumulation_steps": 6, "micro_batch_size": 4}})
    with pytest.raises(ConfigError, match="must divide the 16 trajectories"):
        build_config({"training": {"gradient_accumulation_steps": 5}})
    cfg = build_config({"sampling": {"batch_size": 4, "num_batches_per_epoch": 4}, "training": {"gradient_accumulation_steps": 8}})
    assert cfg.optimizer_steps_per_epoch() == 2


def test_learned_flow_is_rejected_for_training_runs():
    with pytest.raises(ConfigError, match="learned_flow.*no training loop"):
        build_config({"algorithm": {"nabla": {"learned_flow": True}}})


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
    with pytest.raises(ConfigError, match="'nabla', 'nft', 'grpo' or 'reward_backprop'"):
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
