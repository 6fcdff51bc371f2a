"""The DiffSplat transformer forward: ours against DiffSplat's own class, on the same weights and inputs.

    python benchmarks/diffsplat_parity.py --reference-src DIFFSPLAT_CHECKOUT --reference-python PY \
        [--transformer DIR | --size tiny|real] [--device cuda] [--dtype float32|bfloat16] [--out parity.json]

DiffSplat's ``PixArtTransformerMV2DModel`` (``extensions/diffusers_diffsplat`` of a chenguolin/DiffSplat
checkout, fetched for the check and never part of this project) imports diffusers internals of the
version DiffSplat pins (0.32), so it runs in its own interpreter: ``--reference-python`` is a Python
with ``torch``, ``diffusers==0.32.2`` and ``einops``. This script saves fixed inputs, runs both
forwards (the reference in a subprocess of that interpreter, loading the same ``transformer`` folder)
and compares the raw 8-channel outputs at t = 999 and t = 500 as ``‖ours − ref‖ / ‖ref‖``.

Weights: ``--transformer`` is a released ``transformer_ema`` folder (it also reports the parameter count
and any missing or unexpected keys when loading it into our class); without it, random weights of
``--size tiny`` (CPU, seconds) or ``--size real`` (DiffSplat's dimensions, 0.61 B parameters). Our side
runs in ``--dtype`` (bfloat16 with the fp32 softmax the runs use); the reference always in float32, so
the bfloat16 error is the precision loss. Targets: float32 ≤ 1e-5, bfloat16 ≤ 3e-2. Exit status 1 when
a target is missed, 2 when the reference cannot run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TIMESTEPS = (999, 500)
NUM_VIEWS = 4
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
# DiffSplat PixArt-Σ ("pas"): 28 blocks of 16 heads x 72, latent 32² per view, 4 latent + 6 Plücker in,
# ε + learned variance out, T5-XXL captions (4096-d, 300 tokens).
REAL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=10, out_channels=8, num_layers=28,
            cross_attention_dim=1152, sample_size=32, patch_size=2, caption_channels=4096, norm_type="ada_norm_single",
            use_additional_conditions=False, interpolation_scale=None)
TINY = dict(REAL, num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16, sample_size=8,
            caption_channels=32, interpolation_scale=1)
TEXT_LENGTH = {"real": 300, "tiny": 12}
# Random weights wide enough that attention is far from uniform, so the check sees the views attending
# jointly: at tiny size, per-view instead of joint self-attention changes the output by 5% at 0.2
# (by 2e-5 at 0.02, below the float32 target).
RANDOM_INIT_STD = {"real": 0.02, "tiny": 0.2}


def run_reference(reference_src: str, transformer_dir: str, inputs_file: str, output_file: str, device: str) -> None:
    """The reference forward (runs in the reference interpreter: torch and DiffSplat's code only)."""
    import importlib
    import types

    import safetensors.torch  # noqa: F401  diffusers 0.32 uses it without importing it

    # Import the transformer module without the package __init__s, which pull in DiffSplat's pipelines.
    root = Path(reference_src) / "extensions"
    for name, path in [("extensions", root), ("extensions.diffusers_diffsplat", root / "diffusers_diffsplat"),
                       ("extensions.diffusers_diffsplat.models", root / "diffusers_diffsplat" / "models"),
                       ("extensions.diffusers_diffsplat.models.transformers",
                        root / "diffusers_diffsplat" / "models" / "transformers")]:
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    sys.path.insert(0, reference_src)
    module = importlib.import_module("extensions.diffusers_diffsplat.models.transformers.pixart_transformer_mv2d")
    model = module.PixArtTransformerMV2DModel.from_pretrained(transformer_dir, torch_dtype=torch.float32).to(device).eval()
    inputs = torch.load(inputs_file)
    outputs = {}
    with torch.no_grad():
        for t in TIMESTEPS:
            outputs[t] = model(
                inputs["hidden_states"].to(device),
                encoder_hidden_states=inputs["encoder_hidden_states"].to(device),
                encoder_attention_mask=inputs["encoder_attention_mask"].to(device),
                timestep=torch.full((inputs["hidden_states"].shape[0],), t, device=device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                cross_attention_kwargs={"num_views": NUM_VIEWS},
                return_dict=False,
            )[0].float().cpu()
    torch.save(outputs, output_file)


def fixed_inputs(config: dict, text_length: int) -> dict:
    """One object of 4 views: latent + Plücker channels (4, 10, h, w), captions (4, L, D) with a
    right-padded mask (the first 7 tokens real)."""
    g = torch.Generator().manual_seed(0)
    h = config["sample_size"]
    mask = (torch.arange(text_length) < 7).long().expand(NUM_VIEWS, -1)  # (V, L)
    captions = torch.randn(1, text_length, config["caption_channels"], generator=g).expand(NUM_VIEWS, -1, -1)
    return {"hidden_states": torch.randn(NUM_VIEWS, config["in_channels"], h, h, generator=g),
            "encoder_hidden_states": captions * mask[..., None], "encoder_attention_mask": mask}


def our_forward(transformer_dir: Path, inputs: dict, device: str, dtype: str) -> tuple[dict, dict]:
    from r2d3ray.models.mv_attention import PixArtTransformerMV2DModel, set_mv_attention

    torch_dtype = getattr(torch, dtype)
    model, info = PixArtTransformerMV2DModel.from_pretrained(str(transformer_dir), torch_dtype=torch_dtype,
                                                             output_loading_info=True)
    model = set_mv_attention(model, upcast_softmax=dtype != "float32").to(device).eval()
    loading = {"parameters": sum(p.numel() for p in model.parameters()),
               "missing_keys": info["missing_keys"], "unexpected_keys": info["unexpected_keys"]}
    outputs = {}
    with torch.no_grad():
        for t in TIMESTEPS:
            outputs[t] = model(
                inputs["hidden_states"].to(device, torch_dtype),
                encoder_hidden_states=inputs["encoder_hidden_states"].to(device, torch_dtype),
                encoder_attention_mask=inputs["encoder_attention_mask"].to(device),
                timestep=torch.full((NUM_VIEWS,), t, device=device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                cross_attention_kwargs={"num_views": NUM_VIEWS},
                return_dict=False,
            )[0].float().cpu()
    return outputs, loading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-src", required=True, help="a chenguolin/DiffSplat checkout (its extensions/ folder)")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="a Python with torch, diffusers==0.32.2 and einops (default: this one)")
    parser.add_argument("--transformer", help="a transformer_ema folder (default: random weights of --size)")
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument("--out", help="write the numbers as JSON")
    parser.add_argument("--run-reference", nargs=3, metavar=("TRANSFORMER", "INPUTS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_reference:
        run_reference(args.reference_src, *args.run_reference, args.device)
        return 0
    if not (Path(args.reference_src) / "extensions" / "diffusers_diffsplat").is_dir():
        print(f"error: {args.reference_src} is not a DiffSplat checkout (no extensions/diffusers_diffsplat)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.transformer:
            transformer_dir = Path(args.transformer)
            config = json.loads((transformer_dir / "config.json").read_text())
            text_length = TEXT_LENGTH["real"]
        else:
            from diffusers import PixArtTransformer2DModel

            config = REAL if args.size == "real" else TINY
            torch.manual_seed(0)
            transformer_dir = tmp / "transformer"
            model = PixArtTransformer2DModel.from_config(config)
            for p in model.parameters():  # diffusers zero-initialises the output layers; random everywhere instead
                p.data.normal_(0, RANDOM_INIT_STD[args.size])
            model.save_pretrained(transformer_dir)
            del model
            text_length = TEXT_LENGTH[args.size]
        inputs = fixed_inputs(config, text_length)
        torch.save(inputs, tmp / "inputs.pt")

        start = time.perf_counter()
        done = subprocess.run([args.reference_python, __file__, "--reference-src", args.reference_src,
                               "--device", args.device, "--run-reference", str(transformer_dir),
                               str(tmp / "inputs.pt"), str(tmp / "reference.pt")], capture_output=True, text=True)
        if done.returncode:
            print(f"error: the reference forward failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 2
        reference_seconds = time.perf_counter() - start
        reference = torch.load(tmp / "reference.pt")
        ours, loading = our_forward(transformer_dir, inputs, args.device, args.dtype)

    errors = {t: float((ours[t] - reference[t]).norm() / reference[t].norm()) for t in TIMESTEPS}
    passed = all(e <= TOLERANCE[args.dtype] for e in errors.values()) and not loading["missing_keys"] \
        and not loading["unexpected_keys"]
    result = {"weights": args.transformer or f"random ({args.size})", "device": args.device, "dtype": args.dtype,
              "reference_seconds": reference_seconds, **loading,
              "relative_error": {str(t): e for t, e in errors.items()}, "tolerance": TOLERANCE[args.dtype],
              "passed": passed}
    print("| weights | dtype | parameters | missing / unexpected keys | rel. error t=999 | t=500 | target |")
    print("|---|---|---:|---|---:|---:|---|")
    print(f"| {result['weights']} | {args.dtype} | {loading['parameters']:,} | {len(loading['missing_keys'])} / "
          f"{len(loading['unexpected_keys'])} | {errors[999]:.2e} | {errors[500]:.2e} | ≤ {TOLERANCE[args.dtype]:g} "
          f"{'PASS' if passed else 'FAIL'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
