"""LoRA adapters on the denoiser, through peft and diffusers' adapter API.

Defaults follow Nabla-R2D3 (`src/train_nabla_r2d3_diffsplat_pas.py`): rank 8, Gaussian init (B = 0, so a
fresh adapter leaves the model unchanged), alpha = rank (scale 1), and the target names below,
filtered to those the denoiser has. Several named adapters can live on one denoiser ("policy",
and "old" for DiffusionNFT); exactly one is active. peft keeps only the active adapter's weights
trainable (``requires_grad``) and the base weights frozen. The frozen reference model is the same
denoiser with adapters disabled (:func:`adapters_disabled`).

Files are diffusers' LoRA format, as a pipeline's ``save_lora_weights`` writes it:
``pytorch_lora_weights.safetensors`` with peft keys prefixed ``transformer.``
(``transformer.transformer_blocks.0.attn1.to_q.lora_A.weight``) and the adapter's ``LoraConfig``
in the safetensors metadata (``lora_adapter_metadata``), plus peft's ``adapter_config.json``.
``transformer.load_lora_adapter(dir, prefix="transformer")`` loads them as they are. peft's own
``PeftModel.from_pretrained`` reads another file, ``adapter_model.safetensors`` with keys prefixed
``base_model.model.``; :func:`save_peft_adapter` writes that layout (``r2d3ray export`` does).
:func:`load_lora` also reads the files Nabla-R2D3 saves (``StableDiffusionPipeline.save_lora_weights``),
whose keys carry the prefix ``unet.`` instead.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers.loaders import PeftAdapterMixin
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict, set_peft_model_state_dict

DEFAULT_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2",
)  # fmt: skip
LORA_PREFIX = "transformer"
# Key prefixes load_lora reads: ours, and that of the reference's Stable Diffusion pipeline saver.
LOADABLE_PREFIXES = (LORA_PREFIX, "unet")
# A PeftModel holds the model it adapts as ``base_model.model``; its saved keys carry that path.
PEFT_KEY_PREFIX = "base_model.model."


def _check_denoiser(denoiser, adapter: str | None = None) -> None:
    if not isinstance(denoiser, PeftAdapterMixin):
        raise ValueError(
            f"denoiser: expected a diffusers model with the PEFT adapter API (e.g. PixArtTransformerMV2DModel), "
            f"got {type(denoiser).__name__}"
        )
    if adapter is not None and adapter not in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"adapter {adapter!r} is not on the denoiser; it has {sorted(getattr(denoiser, 'peft_config', {}))}")


def add_lora_adapter(
    denoiser,
    name: str = "policy",
    rank: int = 8,
    alpha: float | None = None,
    init: str | bool = "gaussian",
    target_modules=DEFAULT_TARGETS,
) -> LoraConfig:
    """Add LoRA adapter ``name`` (and make it the active one); returns its ``LoraConfig``.

    ``alpha`` defaults to ``rank`` (scale 1). ``init`` is peft's ``init_lora_weights``
    ("gaussian", True, ...). Targets the denoiser does not have are dropped.
    """
    _check_denoiser(denoiser)
    if name in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"adapter {name!r} already exists on the denoiser")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    module_names = [module_name for module_name, _ in denoiser.named_modules()]
    present = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in module_names)]
    if not present:
        raise ValueError(f"target_modules: none of {list(target_modules)} names a module of {type(denoiser).__name__}")
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=init, target_modules=present
    )
    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        denoiser.add_adapter(config, adapter_name=name)
    return config


def use_adapter(denoiser, name: str) -> contextlib.AbstractContextManager:
    """Make adapter ``name`` the active (and trainable) one.

    Also usable as a context manager that restores the previously active adapter on exit:
    ``with use_adapter(denoiser, "old"): ...``.
    """
    _check_denoiser(denoiser, name)
    previous = denoiser.active_adapters()
    denoiser.set_adapter(name)
    return _restore_adapter(denoiser, previous)


@contextlib.contextmanager
def _restore_adapter(denoiser, previous: list[str]):
    try:
        yield denoiser
    finally:
        denoiser.set_adapter(previous)


@contextlib.contextmanager
def adapters_disabled(denoiser):
    """Run the base model (the frozen reference): all adapters off inside the block."""
    _check_denoiser(denoiser)
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def adapter_parameters(denoiser, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter ``name`` keyed by adapter-agnostic names (the saved keys).

    The same key addresses the same weight in every adapter, which makes copies and EMA between
    adapters (DiffusionNFT's "old" policy) a loop over keys; the values are what an optimizer takes.
    """
    _check_denoiser(denoiser, name)
    suffix = f".{name}."
    return {
        param_name.replace(suffix, "."): param
        for param_name, param in denoiser.named_parameters()
        if "lora_" in param_name and suffix in param_name
    }


def save_lora(denoiser, save_directory: str | os.PathLike, adapter: str = "policy") -> Path:
    """Write adapter ``adapter`` in diffusers' LoRA format; returns the weights file path."""
    _check_denoiser(denoiser, adapter)
    config = denoiser.peft_config[adapter]
    weights = get_peft_model_state_dict(denoiser, adapter_name=adapter)
    metadata = {f"{LORA_PREFIX}.{key}": value for key, value in config.to_dict().items()}
    LoraBaseMixin.write_lora_layers(
        state_dict=LoraBaseMixin.pack_weights(weights, LORA_PREFIX),
        save_directory=str(save_directory),
        is_main_process=True,
        weight_name=LORA_WEIGHT_NAME_SAFE,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=metadata,
    )
    # adapter_config.json: rank, alpha and targets beside the weights. peft's from_pretrained also needs
    # adapter_model.safetensors, which only save_peft_adapter writes.
    config.save_pretrained(str(save_directory))
    return Path(save_directory) / LORA_WEIGHT_NAME_SAFE


def save_peft_adapter(denoiser, save_directory: str | os.PathLike, adapter: str = "policy",
                      base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter`` in peft's layout, as ``PeftModel.save_pretrained`` writes it:
    ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``) and
    ``adapter_config.json``, so that ``PeftModel.from_pretrained(transformer, save_directory)`` loads
    it onto the bare base transformer. Returns the weights file path."""
    _check_denoiser(denoiser, adapter)
    config = copy.deepcopy(denoiser.peft_config[adapter])  # the live adapter's config stays as it is
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True  # a finished adapter; PeftModel.from_pretrained(is_trainable=True) undoes it
    weights = {PEFT_KEY_PREFIX + key: value.detach().contiguous()
               for key, value in get_peft_model_state_dict(denoiser, adapter_name=adapter).items()}
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(weights, str(save_directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(save_directory))
    return save_directory / SAFETENSORS_WEIGHTS_NAME


def _key_prefix(path: Path) -> str:
    """The prefix of the LoRA keys in ``path``: "transformer" (ours) or "unet" (Nabla-R2D3's files)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        prefixes = {key.split(".", 1)[0] for key in f.keys()}
    for prefix in LOADABLE_PREFIXES:
        if prefix in prefixes:
            return prefix
    raise ValueError(f"{path} holds no LoRA keys prefixed {' or '.join(repr(p + '.') for p in LOADABLE_PREFIXES)} "
                     f"(its keys start with {sorted(prefixes)[:5]})")


def load_lora(denoiser, load_directory: str | os.PathLike, adapter: str = "policy") -> None:
    """Load ``pytorch_lora_weights.safetensors`` from ``load_directory`` as adapter ``adapter``.

    The keys may be prefixed ``transformer.`` (:func:`save_lora`) or ``unet.`` (the reference's
    files). A new adapter goes through diffusers' ``load_lora_adapter`` (rank and targets from the
    file). If ``adapter`` already exists, the weights are copied into its parameters in place, so
    optimizers holding them stay valid (resuming); shapes must then match. The adapter ends active.
    """
    _check_denoiser(denoiser)
    path = Path(load_directory) / LORA_WEIGHT_NAME_SAFE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: looked for {path} (written by save_lora)")
    prefix = _key_prefix(path)
    if adapter not in getattr(denoiser, "peft_config", {}):
        denoiser.load_lora_adapter(
            str(load_directory), prefix=prefix, adapter_name=adapter, weight_name=LORA_WEIGHT_NAME_SAFE
        )
        denoiser.set_adapter(adapter)
        return

    weights = {k.removeprefix(prefix + "."): v for k, v in safetensors.torch.load_file(str(path)).items()
               if k.startswith(prefix + ".")}
    current = get_peft_model_state_dict(denoiser, adapter_name=adapter)
    mismatched = sorted(set(weights) ^ set(current)) + sorted(
        k for k in set(weights) & set(current) if weights[k].shape != current[k].shape
    )
    if mismatched:
        raise ValueError(
            f"{path} does not fit adapter {adapter!r} (different rank or targets); mismatched keys: {mismatched[:5]}"
            f"{' ...' if len(mismatched) > 5 else ''}"
        )
    set_peft_model_state_dict(denoiser, weights, adapter_name=adapter)
    denoiser.set_adapter(adapter)

