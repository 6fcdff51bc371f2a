"""benchmarks/gpu_check.py in its CPU mode (--quick): the DiffSplat-shaped transition and NFT step
run end to end through the project's code at tiny sizes, the CUDA stages report themselves skipped,
and one stage's failure is reported without stopping the others."""

import json
import math

from scripts import load_script


def test_quick_mode_runs_the_cpu_stages_and_skips_the_cuda_ones(tmp_path, capsys):
    gpu_check = load_script("benchmarks/gpu_check.py", "gpu_check")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    for name in ("render_parity", "bench_render", "tiny_diffsplat_train"):
        assert stages[name]["status"] == "skipped" and "CUDA" in stages[name]["reason"]

    transition = stages["diffsplat_transition"]
    assert transition["status"] == "ok" and transition["gaussian_convention"] == "diffsplat"
    for mode in ("plain", "checkpointing"):
        for algorithm in ("nabla", "nft"):
            result = transition["results"][f"{mode}/{algorithm}"]
            assert math.isfinite(result["loss"]) and result["lora_grad_norm"] > 0  # the step trained the LoRA
        for step in ("render_x0", "reference_score", "policy_score", "reward_pull_back", "backward"):
            assert transition["steps"][f"{mode}/nabla/{step}"]["seconds"] >= 0
    sample = transition["sample"]
    assert 0.4 <= sample["depth_min"] <= sample["depth_max"] <= 2.4  # z = depth channel + 1.4, channel in [-1, 1]
    assert math.isclose(sum(sample["quaternion_norm_fraction"]), 1.0, abs_tol=1e-3)

    estimate = stages["activation_estimate"]
    assert estimate["status"] == "ok" and estimate["transformer_parameters"] > 0
    saved = estimate["saved_bytes"]
    assert saved["transformer_cfg_forward_checkpointed"] < saved["transformer_cfg_forward"]
    printed = capsys.readouterr().out
    assert "| stage | status | seconds | notes |" in printed and "| plain/nabla/backward |" in printed


def test_a_failing_stage_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    gpu_check = load_script("benchmarks/gpu_check.py", "gpu_check")

    def broken(quick):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "stage_render_parity", broken)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--quick", "--stages", "render_parity", "activation_estimate", "--out", str(out)]) == 1
    stages = json.loads(out.read_text())["stages"]
    assert stages["render_parity"]["status"] == "failed" and "simulated" in stages["render_parity"]["error"]
    assert stages["activation_estimate"]["status"] == "ok"
