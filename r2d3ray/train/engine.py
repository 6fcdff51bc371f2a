"""What steps the optimizer: DeepSpeed on Ray Train workers, or a plain torch engine in one process.

Both take one loss per micro-step (``backward`` scales it by 1/accumulation), clip the gradient norm
and step every ``micro_steps_per_update`` micro-steps (``is_gradient_accumulation_boundary`` is asked
before ``step``). The local engine is what the toy benchmark and the single-process tests train with.
"""

from __future__ import annotations

import torch

from r2d3ray.config import R2D3Config


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]  # the policy adapter only


def _optimizer_and_schedule(cfg: R2D3Config, params):
    from diffusers.optimization import get_scheduler

    t = cfg.training
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    schedule = get_scheduler(t.lr_schedule if t.lr_schedule != "constant" else "constant_with_warmup", optimizer,
                             num_warmup_steps=t.lr_warmup_steps,
                             num_training_steps=t.epochs * cfg.optimizer_steps_per_epoch())
    return optimizer, schedule


def deepspeed_engine(cfg: R2D3Config, denoiser: torch.nn.Module, micro_steps_per_update: int):
    """DeepSpeed over the denoiser's trainable (LoRA) parameters; it steps the schedule with the
    optimizer and keeps both in its checkpoints."""
    import deepspeed

    from r2d3ray.train.deepspeed_config import build_deepspeed_config

    params = trainable_parameters(denoiser)
    optimizer, schedule = _optimizer_and_schedule(cfg, params)
    engine, _, _, _ = deepspeed.initialize(model=denoiser, optimizer=optimizer, model_parameters=params,
                                           lr_scheduler=schedule,
                                           config=build_deepspeed_config(cfg.training, micro_steps_per_update))
    return engine


class LocalEngine:
    """The subset of DeepSpeed's engine the run uses, over a torch optimizer in this process."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, micro_steps_per_update: int,
                 max_grad_norm: float, schedule=None):
        self.params, self.optimizer, self.schedule = params, optimizer, schedule
        self.micro_steps_per_update, self.max_grad_norm = micro_steps_per_update, max_grad_norm
        self.micro_steps, self.grad_norm = 0, None

    @classmethod
    def from_config(cls, cfg: R2D3Config, module: torch.nn.Module, micro_steps_per_update: int) -> LocalEngine:
        params = trainable_parameters(module)
        optimizer, schedule = _optimizer_and_schedule(cfg, params)
        return cls(params, optimizer, micro_steps_per_update, cfg.training.max_grad_norm, schedule)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.micro_steps_per_update).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.micro_steps_per_update == 0

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if boundary:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.schedule is not None:
                self.schedule.step()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm
