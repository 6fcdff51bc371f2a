"""Check that r2d3ray's HPSv2 reward scores as the original ``hpsv2`` package does, on the same weights.

    python benchmarks/hps_parity.py --checkpoint /path/to/HPS_v2.1_compressed.pt [--version v2.1]
        [--device cuda] [--images a.png b.png --prompt "..."]
    python benchmarks/hps_parity.py --random-weights      # no download: a seeded random ViT-H-14

Needs the ``hpsv2`` package (``pip install 'r2d3ray[hps-parity]'``) and the HPS checkpoint (Hugging
Face repo xswu/HPSv2). Without either it says what is missing and exits 0. ``--random-weights``
instead saves a seeded random-weight ViT-H-14 built by hpsv2's own factory in the HPS checkpoint
layout (``{"state_dict": ...}``) and loads that file into both models: same weights, so it checks the
architecture, the loading and the preprocessing without the real checkpoint. The hpsv2 wheel lacks
its BPE vocabulary (its tokenizer module fails on import), so hpsv2's open_clip is given open_clip's
tokenizer module, the same SimpleTokenizer and vocabulary, and both models use it.

Two comparisons, on synthetic smooth images (or the given image files):
- model: hpsv2's ViT-H-14 and ours on the same preprocessed tensors; they must agree to float
  round-off (the architectures and weights are the same).
- end to end: hpsv2's official PIL pipeline (uint8, ``preprocess_val``) against our torch
  preprocessing of the same uint8 images; small differences come from PIL's rounding and clipping.
Exits 1 if a difference exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from r2d3ray.rewards.clip_utils import clip_preprocess
from r2d3ray.rewards.hps import HPS_CHECKPOINTS, HPSv2Reward

MODEL_TOLERANCE, END_TO_END_TOLERANCE = 1e-4, 5e-3
DEFAULT_PROMPTS = ["a red wooden chair", "a ceramic teapot with blue flowers", "a toy robot", "a green apple"]


def synthetic_images(n: int, size: int = 256) -> list[Image.Image]:
    """Smooth random colour fields (upsampled noise), the kind of image PIL and torch resize alike."""
    g = torch.Generator().manual_seed(0)
    fields = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bicubic")
    as_uint8 = (fields.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in as_uint8]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="HPS checkpoint file (or a directory holding it)")
    parser.add_argument("--version", default="v2.1", choices=sorted(HPS_CHECKPOINTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", nargs="*", type=Path, help="image files to score (default: synthetic)")
    parser.add_argument("--prompt", help="the prompt for --images (default: one of a fixed list per image)")
    parser.add_argument("--random-weights", action="store_true",
                        help="compare on a seeded random-weight ViT-H-14 instead of a downloaded checkpoint")
    args = parser.parse_args()

    # hpsv2's tokenizer module reads its (missing) vocabulary on import; open_clip's is the same code.
    sys.modules.setdefault("hpsv2.src.open_clip.tokenizer", open_clip.tokenizer)
    try:
        from hpsv2.src.open_clip import create_model_and_transforms
    except ImportError as error:
        print(f"hps_parity: skipped, the hpsv2 package is not importable ({error}). "
              "Install it with `pip install 'r2d3ray[hps-parity]'` to compare against it.")
        return 0

    def their_model():
        # pretrained=None: build the architecture only (no LAION download), as hpsv2/img_score.py does.
        return create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device=args.device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False,
        )

    with tempfile.TemporaryDirectory() as scratch:
        if args.random_weights:
            torch.manual_seed(0)
            args.checkpoint = Path(scratch) / HPS_CHECKPOINTS[args.version]
            torch.save({"state_dict": their_model()[0].state_dict()}, args.checkpoint)
            print(f"random-weight ViT-H-14 (seed 0) saved in the HPS layout at {args.checkpoint}")
        return compare(args, their_model)


def compare(args: argparse.Namespace, their_model) -> int:
    checkpoint = args.checkpoint
    if checkpoint is not None and checkpoint.is_dir():
        checkpoint = checkpoint / HPS_CHECKPOINTS[args.version]
    if checkpoint is None or not checkpoint.is_file():
        print(f"hps_parity: skipped, no HPS checkpoint (looked for {checkpoint}). Pass --checkpoint with "
              f"{HPS_CHECKPOINTS[args.version]} from the Hugging Face repo xswu/HPSv2.")
        return 0

    images = [Image.open(p).convert("RGB") for p in args.images] if args.images else synthetic_images(4)
    prompts = [args.prompt] * len(images) if args.prompt else (DEFAULT_PROMPTS * len(images))[: len(images)]

    ours = HPSv2Reward(checkpoint, version=args.version).to(args.device)
    theirs, _, preprocess_val = their_model()  # then the HPS weights, loaded as hpsv2/img_score.py does
    theirs.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
    theirs.eval()
    tokens = open_clip.get_tokenizer("ViT-H-14")(prompts).to(args.device)

    def their_scores(pixels: torch.Tensor) -> torch.Tensor:
        out = theirs(pixels.to(args.device), tokens)
        return (out["image_features"] * out["text_features"]).sum(-1)  # diag(image @ text.T)

    with torch.no_grad():
        renders = torch.stack([torch.from_numpy(np.asarray(im.resize((256, 256)))) for im in images])
        renders = renders.permute(0, 3, 1, 2).float().div(255).to(args.device)  # (N, 3, 256, 256)
        our_scores = ours.score(renders[:, None], prompts).values[:, 0]  # one view per object
        same_input = their_scores(clip_preprocess(renders, (224, 224)))
        official = their_scores(torch.stack([preprocess_val(im.resize((256, 256))) for im in images]))

    model_diff = (our_scores - same_input).abs().max().item()
    e2e_diff = (our_scores - official).abs().max().item()
    for prompt, a, b, c in zip(prompts, our_scores.tolist(), same_input.tolist(), official.tolist()):
        print(f"{prompt[:40]:40s}  ours {a:.5f}  hpsv2 same input {b:.5f}  hpsv2 official {c:.5f}")
    ok = model_diff <= MODEL_TOLERANCE and e2e_diff <= END_TO_END_TOLERANCE
    print(f"model max |diff| {model_diff:.2e} (tol {MODEL_TOLERANCE:.0e}); "
          f"end-to-end max |diff| {e2e_diff:.2e} (tol {END_TO_END_TOLERANCE:.0e}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
