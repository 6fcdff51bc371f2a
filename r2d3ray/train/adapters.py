"""The LoRA adapters a run trains and keeps, and where a checkpoint stores each.

"policy" is the trained adapter. DiffusionNFT keeps copies that follow it: "old" (the behaviour
policy) and, with ema_decay > 0, "ema" (what it evaluates and saves). The deployed adapter, the one
evaluation pictures, the final LoRA and a checkpoint's ``lora/`` come from, is the EMA when kept,
else the policy.
"""

from __future__ import annotations

from pathlib import Path

from r2d3ray.config import R2D3Config
from r2d3ray.models.lora import add_lora_adapter, load_lora, save_lora, use_adapter
from r2d3ray.train.updates import blend_adapter_


def policy_copies(cfg: R2D3Config) -> tuple[str, ...]:
    """Adapters beside "policy" that follow it: DiffusionNFT's behaviour policy "old" and, with
    ema_decay > 0, its evaluation EMA "ema"."""
    if cfg.algorithm.name != "nft":
        return ()
    return ("old", "ema") if cfg.algorithm.nft.ema_decay > 0 else ("old",)


def deployed_adapter(cfg: R2D3Config) -> str:
    """DiffusionNFT's EMA when it keeps one (as its reference evaluates and saves), else the policy."""
    return "ema" if "ema" in policy_copies(cfg) else "policy"


def add_adapters(generator, cfg: R2D3Config) -> None:
    """The trained "policy" LoRA adapter and its `policy_copies`, each an exact copy of it at the start
    (as DiffusionNFT copies its adapter into "old"; a checkpoint may overwrite them); "policy" ends active."""
    for adapter in ("policy", *policy_copies(cfg)):
        add_lora_adapter(generator.denoiser, adapter, rank=cfg.lora.rank, alpha=cfg.lora.alpha, init=cfg.lora.init,
                         target_modules=cfg.lora.target_modules)
        if adapter != "policy":
            blend_adapter_(generator, adapter, "policy", decay=0.0)
    use_adapter(generator.denoiser, "policy")


def lora_dir(cfg: R2D3Config, adapter: str) -> str:
    """A checkpoint's folder for ``adapter``: ``lora`` for the deployed one (what eval, infer and the
    demo load), ``lora_<adapter>`` for the others (``lora_old``, and ``lora_policy`` when the EMA is deployed)."""
    return "lora" if adapter == deployed_adapter(cfg) else f"lora_{adapter}"


def save_adapters(generator, cfg: R2D3Config, path: Path) -> None:
    for adapter in ("policy", *policy_copies(cfg)):
        save_lora(generator.denoiser, Path(path) / lora_dir(cfg, adapter), adapter=adapter)


def restore_adapters(generator, cfg: R2D3Config, path: Path) -> None:
    for adapter in ("policy", *policy_copies(cfg)):
        load_lora(generator.denoiser, Path(path) / lora_dir(cfg, adapter), adapter=adapter)
    use_adapter(generator.denoiser, "policy")  # loading made each adapter active in turn
