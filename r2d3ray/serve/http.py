"""HTTP access to the reward plane, for jobs that are not Ray programs.

    POST /rewards/{name}   JSON body (`ScoreRequest`):
        {"prompts": ["a red cube", ...],                       # B strings
         "images_npy": "<base64 of a .npy file>",              # (B, V, 3, H, W) float in [0, 1]
           or "images_png": [["<base64 PNG>", ...], ...],      # B lists of V PNGs (transparency
                                                               #   is composited onto white)
         "extras_npy": {"alphas": "<base64 .npy>", ...},       # when the reward needs them
         "with_grad": false, "grad_dtype": "float32"}
      -> `ScoreResponse`: {"reward": name, "values": [[...]] (null where not finite),
          "finite": [[...]], "mean": mean of the finite values or null,
          "grad_npy": "<base64 .npy (B, V, 3, H, W)>" when with_grad}
    GET /rewards           the served reward names
    GET /openapi.json, /docs   the schema
    GET /healthz           {"status": "ok"}, the one route that needs no token

Off loopback every route but /healthz wants ``Authorization: Bearer <token>``: the token comes from
the environment variable or file the app config's ``http`` section names (never from the config
itself), and the ingress keeps only its SHA-256.

Arrays travel as `.npy` bytes whose header is read before anything is allocated; the data is then
viewed as the declared float dtype. Nothing is ever unpickled: a pickle or an object-dtype array is
rejected. JSON with base64 keeps the API to one request and one response and needs no multipart
parser. Bad input gets a 4xx JSON `{"error": ...}` naming the problem; the server keeps serving.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import ipaddress
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

api = FastAPI(
    title="r2d3ray rewards",
    description="Rewards and reward gradients of rendered views (B objects x V views), float32 in [0, 1].",
)


HEALTH_ROUTE = "/healthz"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def http_token(http: dict) -> str | None:
    """The bearer token the app config's ``http`` section points at (its ``token_file``, else the
    environment variable ``token_env``); None when neither is set. Off loopback a token is required."""
    token = None
    if http.get("token_file"):
        path = Path(http["token_file"]).expanduser()
        if not path.is_file():
            raise ValueError(f"http.token_file {str(path)!r} does not exist; write the token there or unset it")
        token = path.read_text().strip() or None
    elif http.get("token_env"):
        token = os.environ.get(http["token_env"], "").strip() or None
    if token is None and not is_loopback(http["host"]):
        raise ValueError(
            f"http.host is {http['host']!r}, beyond loopback, and no bearer token is set: export "
            f"{http.get('token_env') or 'the variable named by http.token_env'} or name a file in http.token_file "
            "(clients then send 'Authorization: Bearer <token>'), or keep http.host: 127.0.0.1")
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@api.middleware("http")
async def require_token(request: Request, call_next):
    """Every route but the health route checks the bearer token when the app has one."""
    expected = getattr(request.app.state, "token_sha256", None)
    path, prefix = request.url.path, request.scope.get("root_path", "")  # Serve mounts the app at its route prefix
    if expected is not None and path.removeprefix(prefix) != HEALTH_ROUTE:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), expected):
            return JSONResponse(status_code=401, content={"error": "missing or wrong bearer token "
                                                          "(send 'Authorization: Bearer <token>')"},
                                headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1, description="one prompt per object")
    images_npy: str | None = Field(None, description="base64 .npy, (B, V, 3, H, W) float in [0, 1]")
    images_png: list[list[str]] | None = Field(None, description="B lists of V base64 PNGs (RGB or RGBA)")
    extras_npy: dict[str, str] = Field(default_factory=dict, description="alphas/depths/normals, base64 .npy")
    with_grad: bool = False
    grad_dtype: Literal["float32", "float16"] = "float32"


class ScoreResponse(BaseModel):
    reward: str
    values: list[list[float | None]] = Field(description="(B, V) rewards; null where not finite")
    finite: list[list[bool]] = Field(description="(B, V) False where the reward or its gradient is NaN/inf")
    mean: float | None = Field(description="mean of the finite values; null when there are none")
    grad_npy: str | None = Field(None, description="base64 .npy, (B, V, 3, H, W), zero on non-finite views")


class ErrorResponse(BaseModel):
    error: str


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _b64(field: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"{field} is not valid base64") from None


def _npy(field: str, text: str) -> np.ndarray:
    """A float32 array from base64 .npy bytes; the header is checked before any allocation."""
    stream = io.BytesIO(_b64(field, text))
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran_order, dtype = read_header[version](stream)
    except (ValueError, KeyError):
        raise BadRequest(
            400, f"{field} is not a .npy file (format 1.0 or 2.0); pickles and other formats are never loaded"
        ) from None
    if dtype.hasobject:
        raise BadRequest(400, f"{field} holds Python objects (dtype {dtype}), which only a pickle can restore; "
                              "pickles are never loaded; send float32")
    if dtype.kind != "f":
        raise BadRequest(422, f"{field} has dtype {dtype}; expected float32")
    data = stream.getbuffer()[stream.tell():]
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise BadRequest(400, f"{field} declares shape {list(shape)} {dtype} but holds {len(data)} bytes of data")
    array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")
    return array.astype(np.float32, copy=False)


def _png(field: str, text: str, max_size: int) -> np.ndarray:
    """(3, H, W) float32 in [0, 1] from a base64 PNG; the size is checked before decoding."""
    try:
        image = Image.open(io.BytesIO(_b64(field, text)))
        if image.format != "PNG":
            raise BadRequest(415, f"{field} is a {image.format} image; send PNG")
        if max(image.size) > max_size:
            height, width = image.size[1], image.size[0]
            raise BadRequest(413, f"{field} is {height}x{width}; the limit is {max_size} pixels per side")
        image.load()
    except BadRequest:
        raise
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for corrupt files
        raise BadRequest(400, f"{field} is not a readable PNG image") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Renders have a white background; composite transparent pixels onto it.
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def parse_request(body: bytes, limits: dict) -> tuple[ScoreRequest, np.ndarray, dict[str, np.ndarray]]:
    """Decode and check one request body; raise BadRequest with the reason."""
    try:
        req = ScoreRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(422, f"{where}: {first['msg']}") from None
    if (req.images_npy is None) == (req.images_png is None):
        raise BadRequest(422, "send exactly one of images_npy or images_png")
    if req.images_npy is not None:
        images = _npy("images_npy", req.images_npy)
    else:
        views = {len(v) for v in req.images_png}
        if len(views) != 1 or 0 in views:
            raise BadRequest(422, "images_png must hold the same number (>= 1) of views for every object")
        if len(req.images_png) > limits["max_batch"] or len(req.images_png[0]) > limits["max_views"]:
            raise BadRequest(413, f"images_png holds {len(req.images_png)} objects x {len(req.images_png[0])} views; "
                                  f"the limit is {limits['max_batch']} objects x {limits['max_views']} views")
        decoded = [[_png(f"images_png[{b}][{v}]", s, limits["max_image_size"]) for v, s in enumerate(obj)]
                   for b, obj in enumerate(req.images_png)]
        if len({img.shape for obj in decoded for img in obj}) != 1:
            raise BadRequest(422, "all images_png must have the same size")
        images = np.stack([np.stack(obj) for obj in decoded])
    if images.ndim != 5 or images.shape[2] != 3:
        raise BadRequest(422, f"images have shape {list(images.shape)}; expected (B, V, 3, H, W)")
    b, v, _, h, w = images.shape
    if b > limits["max_batch"] or v > limits["max_views"]:
        raise BadRequest(413, f"batch of {b} objects x {v} views exceeds the limit of "
                              f"{limits['max_batch']} objects x {limits['max_views']} views")
    if max(h, w) > limits["max_image_size"]:
        raise BadRequest(413, f"images are {h}x{w}; the limit is {limits['max_image_size']} pixels per side")
    if b != len(req.prompts):
        raise BadRequest(422, f"{len(req.prompts)} prompts for {b} objects; send one prompt per object")
    if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
        raise BadRequest(422, "images must be finite and within [0, 1]")
    extras = {k: _npy(f"extras_npy.{k}", s) for k, s in req.extras_npy.items()}
    for key, array in extras.items():
        if array.ndim != 5 or array.shape[:2] != (b, v) or array.shape[3:] != (h, w):
            raise BadRequest(422, f"extras_npy.{key} has shape {list(array.shape)}; expected ({b}, {v}, C, {h}, {w})")
    return req, images, extras


def encode_npy(array: np.ndarray) -> str:
    """base64 of the .npy file of `array` (the inverse of what the endpoint reads)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def _last_line(err: Exception) -> str:
    # A remote error's text carries the replica's traceback; its last line is the reason.
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 500)}
# The route reads the raw body (to bound its size before parsing); the schema is declared here.
_BODY = {"requestBody": {
    "required": True, "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}},
}}


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(api)
class RewardsHTTP:
    """Routes HTTP requests to the reward deployments through their handles."""

    def __init__(self, limits: dict, rewards: dict, token_sha256: str | None = None, fingerprint: dict | None = None):
        from r2d3ray.serve.wire import object_store_anchor

        self.limits = limits
        self.rewards = rewards  # name -> DeploymentHandle
        self._fingerprint = fingerprint or {}
        self._anchor = object_store_anchor()
        api.state.token_sha256 = token_sha256  # read by require_token; one ingress per replica process

    def fingerprint(self) -> dict:
        """What the app serves (serve/deployments.py's `app_fingerprint`); jobs compare it by handle."""
        return self._fingerprint

    @api.get(HEALTH_ROUTE)
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/rewards")
    async def list_rewards(self) -> dict:
        return {"rewards": sorted(self.rewards)}

    @api.post("/rewards/{name}", response_model=ScoreResponse, responses=_ERRORS, openapi_extra=_BODY)
    async def score(self, name: str, request: Request):
        try:
            if name not in self.rewards:
                raise BadRequest(404, f"unknown reward {name!r}; served rewards: {', '.join(sorted(self.rewards))}")
            max_bytes = int(self.limits["max_body_mb"] * 2**20)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise BadRequest(413, f"body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")
            body = bytearray()
            async for chunk in request.stream():  # a body without Content-Length stops at the limit too
                body += chunk
                if len(body) > max_bytes:
                    raise BadRequest(413, f"body exceeds the limit of {max_bytes} bytes")
            # Decoding megabytes of base64 and JSON runs off the event loop, so other requests go on.
            req, images, extras = await asyncio.to_thread(parse_request, bytes(body), self.limits)
            try:
                handle = self.rewards[name]
                result = await handle.score.remote(images, req.prompts, extras, req.with_grad, req.grad_dtype)
            except ValueError as err:  # the reward's own input validation (e.g. an unknown prompt word)
                raise BadRequest(422, f"reward {name!r}: {_last_line(err)}") from None
            except Exception as err:
                raise BadRequest(500, f"reward {name!r} failed: {_last_line(err)}") from None
        except BadRequest as err:
            return JSONResponse(status_code=err.status, content={"error": str(err)})
        values, finite = result["values"], result["finite"]
        content = {
            "reward": name,  # JSON has no NaN: non-finite values become null
            "values": [[x if ok else None for x, ok in zip(*rows)] for rows in zip(values.tolist(), finite.tolist())],
            "finite": finite.tolist(),
            "mean": float(values[finite].mean()) if finite.any() else None,
        }
        if req.with_grad:
            content["grad_npy"] = await asyncio.to_thread(encode_npy, result["grads"])
        return content
