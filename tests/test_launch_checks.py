"""What `r2d3ray train` (and its --dry-run) checks before any worker starts (r2d3ray/train/launch.py):
each refusal names the problem, on a tiny DiffSplat directory in the real layout. No Ray needed."""
import shutil

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from ray.core.generated import autoscaler_pb2

from r2d3ray.config import build_config
from r2d3ray.models.diffsplat import write_prompt_cache_shard
from r2d3ray.models.schedulers import PIXART_SIGMA_SCHEDULER_CONFIG
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.models.tiny_diffsplat import TINY_GSVAE_CONFIG, TINY_TRANSFORMER_CONFIG  # the real classes at toy sizes
from r2d3ray.train.launch import ClusterCapacity, LaunchError, can_add_nodes, check_resources, make_plan

CACHED = ["", "a red car", "a wooden chair"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    model = root / "diffsplat"
    PixArtTransformer2DModel.from_config(TINY_TRANSFORMER_CONFIG).save_pretrained(model / "transformer")
    AutoencoderKL(**TINY_GSVAE_CONFIG).save_pretrained(model / "gsvae")
    DPMSolverMultistepScheduler.from_config(PIXART_SIGMA_SCHEDULER_CONFIG).save_config(model / "scheduler")
    lengths = torch.tensor([1, 3, 4])
    mask = (torch.arange(6) < lengths[:, None]).long()  # (3, 6)
    write_prompt_cache_shard(model / "prompt_cache", CACHED, torch.randn(3, 6, 32) * mask[..., None], mask, "toy-t5")
    (root / "prompts.txt").write_text("a red car\na wooden chair\n")
    app = {"app_name": "rewards", "deployments": [{"name": "color_match", "reward": "color_match", "num_cpus": 0}]}
    (root / "rewards.yaml").write_text(yaml.safe_dump(app))
    return root


def make_cfg(root, *overrides: str, model=None):
    return build_config({}, [
        "model.kind=diffsplat", f"model.path={model or root / 'diffsplat'}", f"prompts.file={root / 'prompts.txt'}",
        f"rewards.app_config={root / 'rewards.yaml'}", f"output_dir={root / 'out'}", *overrides,
    ])


def test_a_complete_run_passes_and_dry_run_writes_nothing(workspace):
    plan = make_plan(make_cfg(workspace))
    assert plan.num_prompts == 2 and "prompts: 2" in plan.describe()
    assert not (workspace / "out").exists()  # the storage check leaves no trace


@pytest.mark.parametrize("missing", [
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "gsvae/config.json",
    "gsvae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "prompt_cache",
])  # fmt: skip
def test_a_missing_model_component_is_named(workspace, tmp_path, missing):
    model = tmp_path / "model"
    shutil.copytree(workspace / "diffsplat", model)
    target = model / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(LaunchError, match="is incomplete") as info:
        make_plan(make_cfg(workspace, model=model))
    assert str(target) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_sharded_transformer_weights_count_and_the_tiny_prior_is_checked_too(workspace, tmp_path):
    model = tmp_path / "sharded"
    shutil.copytree(workspace / "diffsplat", model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model-00001-of-00001.safetensors"))
    weights.with_name(weights.name + ".index.json").write_text("{}")
    make_plan(make_cfg(workspace, model=model))

    tiny = tmp_path / "tiny"
    TinySplatGenerator.from_config({"resolution": 16, "num_layers": 1}).save_pretrained(tiny)
    (tiny / "prompt_encoder" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LaunchError, match="prompt_encoder/diffusion_pytorch_model.safetensors is missing"):
        make_plan(build_config({}, [f"model.path={tiny}", f"rewards.app_config={workspace / 'rewards.yaml'}",
                                    f"output_dir={workspace / 'out'}"]))


def test_missing_or_empty_prompt_set_is_refused(workspace, tmp_path):
    with pytest.raises(LaunchError, match="prompts: prompt file .*nowhere.txt.* does not exist"):
        make_plan(make_cfg(workspace, f"prompts.file={tmp_path / 'nowhere.txt'}"))
    (tmp_path / "empty.txt").write_text("# no prompts\n")
    with pytest.raises(LaunchError, match="has no prompts"):
        make_plan(make_cfg(workspace, f"prompts.file={tmp_path / 'empty.txt'}"))


def test_prompts_missing_from_the_cache_are_named_with_the_fix(workspace, tmp_path):
    uncached = ["a blue table", "a green lamp", "a tall vase", "a small boat"]
    (tmp_path / "prompts.txt").write_text("\n".join(["a red car", *uncached]) + "\n")
    with pytest.raises(LaunchError) as info:
        make_plan(make_cfg(workspace, f"prompts.file={tmp_path / 'prompts.txt'}"), config_file="configs/mine.yaml")
    message = str(info.value)
    assert message.startswith("4 of the 6 prompts the run encodes")  # 5 training prompts and ""
    assert "'a blue table', 'a green lamp', 'a tall vase', ..." in message and "a small boat" not in message
    assert "`r2d3ray prepare-diffsplat --config configs/mine.yaml ...`" in message

    with pytest.raises(LaunchError, match=r"1 of the 4 prompts .*: 'a purple kite'"):  # evaluation prompts too
        make_plan(make_cfg(workspace, "tracking.eval_prompts=[a purple kite]"))


def test_reward_app_must_serve_the_terms_under_the_name_the_workers_attach_to(workspace):
    with pytest.raises(LaunchError, match=r"rewards.app_name is 'other' but .* deploys app_name 'rewards'"):
        make_plan(make_cfg(workspace, "rewards.app_name=other"))
    with pytest.raises(LaunchError, match=r"\['hps'\].*does not serve"):
        make_plan(make_cfg(workspace, "rewards.terms=[{name: hps}]"))
    with pytest.raises(LaunchError, match="rewards.app_config: reward app config .* does not exist"):
        make_plan(make_cfg(workspace, f"rewards.app_config={workspace / 'missing.yaml'}"))


def test_unwritable_storage_is_refused(workspace, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(LaunchError, match="storage: cannot write checkpoints under .*a_file/out/ray_results"):
        make_plan(make_cfg(workspace, f"output_dir={tmp_path / 'a_file' / 'out'}"))


def test_resources_an_autoscaler_can_add_give_a_warning_not_a_refusal(workspace):
    plan = make_plan(make_cfg(workspace, "training.num_workers=2", "training.use_gpu=true", "training.cpus_per_worker=8"))
    assert (plan.cpus_needed, plan.gpus_needed) == (16, 2)
    small = {"CPU": 4.0}
    assert check_resources(plan, ClusterCapacity({"CPU": 32.0, "GPU": 2.0}, None, autoscales=False)) is None
    with pytest.raises(LaunchError, match="the cluster has 4 CPUs and 0 GPUs; the run needs 16 CPUs and 2 GPUs"):
        check_resources(plan, ClusterCapacity(small, None, autoscales=False))
    warning = check_resources(plan, ClusterCapacity(small, {"CPU": 64, "GPU": 8}, autoscales=True))
    assert "the autoscaler has to add nodes" in warning
    assert "add nodes" in check_resources(plan, ClusterCapacity(small, None, autoscales=True))  # maximum unknown
    with pytest.raises(LaunchError, match="its autoscaler can reach at most 1 GPUs"):
        check_resources(plan, ClusterCapacity(small, {"CPU": 64, "GPU": 1}, autoscales=True))


def test_which_autoscaler_configs_can_add_nodes():
    def config(*groups):
        return autoscaler_pb2.ClusterConfig(node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name=f"g{i}", resources=resources, min_count=low, max_count=high)
            for i, (resources, low, high) in enumerate(groups)])

    assert not can_add_nodes(None)  # no autoscaler
    assert not can_add_nodes(config(({"CPU": 8}, 2, 2)))  # a fixed-size group
    assert can_add_nodes(config(({"CPU": 8}, 2, 2), ({"GPU": 1}, 0, 4)))
    assert can_add_nodes(config(({"CPU": 8}, 0, -1)))  # unbounded


def test_a_failed_fit_is_labelled_by_the_type_of_the_workers_exception():
    import errno

    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from r2d3ray.config import ConfigError
    from r2d3ray.serve.client import RewardPlaneError
    from r2d3ray.train.launch import failed_component

    def failed(exc):
        return WorkerGroupError("workers failed", {0: UserExceptionWithTraceback(exc, "Traceback ...")})

    plane = RewardPlaneError("reward 'hps' unreachable past its 600 s retry budget")
    assert failed_component(failed(plane)) == ("reward endpoint", plane)
    assert failed_component(failed(ConfigError("bad key")))[0] == "configuration"
    full = OSError(errno.ENOSPC, "No space left on device")
    assert failed_component(failed(full))[0] == "storage"
    # A message that merely mentions rewards is no reward-endpoint failure.
    assert failed_component(failed(RuntimeError("reward tensor had the wrong shape")))[0] == "training worker"
