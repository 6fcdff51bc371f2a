"""The wire format of the reward plane: what a trainer and a reward deployment exchange.

Handle calls carry numpy only, never torch, so arrays travel zero-copy through the object store
on one node:

    score(images, prompts, extras, with_grad, grad_dtype) -> dict
      images      (B, V, 3, H, W) float32 in [0, 1]: the ObjectRef of one ray.put, passed as it is
                  (a top-level argument) to every deployment, which reads it in place
      prompts     list of B strings
      extras      {"alphas" | "depths" | "normals": (B, V, C, H, W) float32}, may be empty
      with_grad   bool; grad_dtype "float32" | "float16" | "bfloat16"
      returns     {"values": (B, V) float32 (raw, NaN where the reward is), "finite": (B, V) bool,
                   "grads": (B, V, 3, H, W) or None, "extra_grads": {name: array}}
    Gradients of non-finite views are zero. bfloat16 has no numpy dtype: such gradients travel
    as uint16 bit patterns (see `encode_grad`). bfloat16 keeps float32's range; float16 loses
    relative precision below 6e-5 and flushes |g| < 6e-8 to zero, so prefer bfloat16.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from r2d3ray.rewards.base import RewardOutput

GRAD_DTYPES = ("float32", "float16", "bfloat16")


def object_store_anchor():
    """A 1 MiB object to hold for a process's lifetime, so the object store stays mapped in it.

    Ray's object-store client unmaps the store from a process when none of its objects is in
    use there, and maps it anew for the next one: every page of every request's images and
    gradients is then page-faulted in again (measured: a 12.6 MB put takes 16 ms instead of 5).
    """
    import ray

    return ray.put(np.zeros(2**18, np.float32))


def encode_views(tensor: torch.Tensor) -> np.ndarray:
    """Images or an extra, (B, V, C, H, W) on any device, as the float32 host array that is put in the
    object store (converted on its own device first; a float32 CPU tensor is used as it is)."""
    return tensor.detach().float().cpu().contiguous().numpy()


def encode_grad(grad: torch.Tensor, dtype: str) -> np.ndarray:
    """A gradient (on any device) as the numpy array sent over the wire in `dtype`.

    Converted on the gradient's own device before the copy to the host, so a GPU converts and
    a reduced-precision copy moves half the bytes. A float32 CPU gradient is sent as it is, no copy.
    """
    grad = grad.detach().to(getattr(torch, dtype)).cpu()
    if dtype == "bfloat16":
        return grad.view(torch.int16).numpy().view(np.uint16)
    return grad.numpy()


def decode_grad(array: np.ndarray, dtype: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse of `encode_grad`: a float32 tensor on `device`, converted there (after the copy to it).

    No host copy: a float32 answer used on the CPU is the received array itself. Arrays read from
    the object store are read-only views of shared memory, so the tensor may be too: callers only
    read it (the combiner multiplies it into a new tensor). The tensor holds the array, and so
    the object-store buffer, alive for as long as it lives.
    """
    with warnings.catch_warnings():
        # torch warns that it cannot mark the tensor read-only; nothing writes into it (above).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if dtype == "bfloat16":  # uint16 bit patterns: reinterpreted, not converted, on the host
            wire = torch.from_numpy(np.asarray(array).view(np.int16)).view(torch.bfloat16)
        else:
            wire = torch.from_numpy(np.asarray(array))
    return wire.to(device).float()


def encode_answer(out: RewardOutput, objects: slice, with_grad: bool, dtype: str) -> dict:
    """The answer to one request, ``objects`` of a scored batch: values and finite (B, V) and, when
    asked, gradients in `dtype`. Slices along B of the batch's tensors are views, not copies."""
    answer = {"values": out.values[objects].float().cpu().numpy(), "finite": out.finite[objects].cpu().numpy(),
              "grads": None, "extra_grads": {}}
    if with_grad:
        answer["grads"] = encode_grad(out.grads[objects], dtype)
        answer["extra_grads"] = {k: encode_grad(g[objects], dtype) for k, g in out.extra_grads.items()}
    return answer


def decode_answer(answer: dict, dtype: str, device: torch.device | str) -> RewardOutput:
    """Inverse of `encode_answer`, on `device`; the gradients as `decode_grad` gives them (read-only)."""
    grads = None if answer["grads"] is None else decode_grad(answer["grads"], dtype, device)
    # values and finite are (B, V): copied, writable, negligible.
    return RewardOutput(torch.from_numpy(np.array(answer["values"], dtype=np.float32)).to(device), grads,
                        {k: decode_grad(a, dtype, device) for k, a in answer["extra_grads"].items()},
                        finite=torch.from_numpy(np.array(answer["finite"], dtype=bool)).to(device))
