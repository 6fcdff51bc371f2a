"""Our training config -> a DeepSpeed config dict (OpenRLHF-style builder, one place).

The engine wraps only the LoRA parameters. The optimizer is a torch AdamW passed to
`deepspeed.initialize` rather than named in the DeepSpeed config: a named optimizer makes DeepSpeed
JIT-build fused_adam/cpu_adam on first use (minutes on a fresh CPU machine), and LoRA optimizer
states are small enough that the fused kernels buy nothing.
"""

from __future__ import annotations

from r2d3ray.config import TrainingConfig


def build_deepspeed_config(training: TrainingConfig, micro_steps_per_update: int) -> dict:
    """`micro_steps_per_update`: engine.backward calls per optimizer step, i.e. the micro-batches of
    `micro_batch_size` trajectories in `gradient_accumulation_steps` trajectories, times the
    algorithm's transitions per trajectory. DeepSpeed divides each micro-batch's (per-sample mean)
    loss by it, as the reference (micro-batches of 1) divides by grad_accum x num_train_timesteps."""
    zero: dict = {"stage": training.zero_stage}
    if training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": training.use_gpu}
    if training.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": training.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": micro_steps_per_update,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": training.precision == "bf16"},
        # Our torch AdamW is allowed with offloading (DeepSpeed would insist on its CPU Adam).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
