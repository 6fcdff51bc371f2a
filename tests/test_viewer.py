"""The evaluation report's 3D splat viewer: the data it embeds, and the report page in a real headless
Chromium opened from disk (no console errors, objects drawn where the canvases are, orbit and zoom).

Without Chromium the browser test skips locally and fails under CI (CI set): install it with
``apt-get install -y chromium`` (.ci/run does that when apt-get is there).
"""

import base64
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r2d3ray.eval.metrics import Evaluation, RunSpec
from r2d3ray.eval.report import write_report
from r2d3ray.eval.viewer import pack_splats
from r2d3ray.models.pipeline import render_views
from r2d3ray.models.world import render_ground_truth
from r2d3ray.render.cameras import default_rig
from r2d3ray.render.rasterize import gaussian_covariances
from r2d3ray.splats import Splats, decode_splatter_images

BACKGROUND = 237  # the viewer's 0.93 grey, in 8 bits
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def unpack(payload: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A payload's data as means (n, 3), covariances (n, 6), RGBA (n, 4) uint8, as the viewer reads it."""
    data, n = base64.b64decode(payload["data"]), payload["count"]
    assert len(data) == n * 22
    low, high = np.array(payload["bounds"][:3]), np.array(payload["bounds"][3:])
    means = low + np.frombuffer(data, "<u2", 3 * n).reshape(n, 3) * (high - low) / 65535
    halves = np.frombuffer(data, "<f2", 6 * n, offset=6 * n).reshape(n, 6)
    rgba = np.frombuffer(data, np.uint8, 4 * n, offset=18 * n).reshape(n, 4)
    return means, halves.astype(np.float64) * payload["covariance_scale"], rgba


def assert_close(covariances: np.ndarray, expected: torch.Tensor, scale: float):
    """float16 over ``scale``: ~3 significant digits."""
    assert np.allclose(covariances, expected[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]].numpy(), rtol=1e-3,
                       atol=1e-7 * scale)


def test_pack_splats_keeps_the_visible_gaussians_in_the_pipelines_convention():
    g = torch.Generator().manual_seed(0)
    n = 6
    splats = Splats(
        means=torch.randn(1, n, 3, generator=g),
        quats=torch.randn(1, n, 4, generator=g) * 2,  # not unit: the two conventions differ
        scales=torch.rand(1, n, 3, generator=g) * 0.05 + 0.01,
        opacities=torch.tensor([[0.9, 0.0, 0.5, 1.0, 0.002, 0.7]]),  # 0 and 0.002 are never drawn
        colors=torch.rand(1, n, 3, generator=g),
    )
    visible = [0, 2, 3, 5]
    for convention in ("gsplat", "diffsplat"):
        payload = pack_splats(splats, convention)
        assert (payload["count"], payload["visible"], payload["total"]) == (4, 4, n)
        means, covariances, rgba = unpack(payload)
        full = gaussian_covariances(splats.quats[0], splats.scales[0], convention)[visible]  # (4, 3, 3)
        extent = np.ptp(splats.means[0, visible].numpy(), axis=0)
        assert np.allclose(means, splats.means[0, visible].numpy(), rtol=0, atol=extent.max() / 65535)
        assert_close(covariances, full, payload["covariance_scale"])
        assert np.array_equal(rgba[:, 3], [230, 128, 255, 178])
        assert np.abs(rgba[:, :3] / 255 - splats.colors[0, visible].numpy()).max() <= 0.5 / 255 + 1e-6
    assert not np.allclose(unpack(pack_splats(splats, "gsplat"))[1], covariances)

    # Over the limit, a fixed subset stays, in the original order, each covering visible / kept as much.
    payload = pack_splats(splats, "diffsplat", max_gaussians=2)
    assert (payload["count"], payload["visible"]) == (2, 4) and payload == pack_splats(splats, "diffsplat", 2)
    means, covariances, _ = unpack(payload)
    kept = [visible[k] for k in range(4)
            if np.isclose(splats.means[0, visible[k]].numpy(), means, atol=1e-4).all(-1).any()]
    assert len(kept) == 2 and np.allclose(means, splats.means[0, kept].numpy(), atol=1e-4)
    full = gaussian_covariances(splats.quats[0], splats.scales[0], "diffsplat")[kept]
    assert_close(covariances, 2 * full, payload["covariance_scale"])

    with pytest.raises(ValueError, match="expected one object \\(B=1\\), got B=2"):
        pack_splats(Splats(*(torch.cat([t, t]) for t in (splats.means, splats.quats, splats.scales,
                                                         splats.opacities, splats.colors))))
    with pytest.raises(ValueError, match="max_gaussians=0 must be between 1 and"):
        pack_splats(splats, max_gaussians=0)


# ----------------------------------------------------------------------------- the report in a browser


def ground_truth_splats(prompts: list[str]) -> Splats:
    """The tiny world's exact objects as splats (4 views x 32², one Gaussian per pixel, misses transparent)."""
    rig = default_rig(num_views=4, size=32)
    return decode_splatter_images(render_ground_truth(prompts, rig, 32), rig.c2w)


def report_with_viewers(out: Path, viewer_gaussians: int = 32768) -> Path:
    """A two-run report whose prompts show different objects per run, so each canvas has a known colour."""
    prompts = ["a red cube", "a green torus"]
    splats = {"base": ground_truth_splats(["a red cube", "a green torus"]),
              "tuned": ground_truth_splats(["a blue tall cylinder", "a yellow cone"])}
    pictures = {label: render_views(s, default_rig(num_views=4, size=32))["images"] for label, s in splats.items()}
    samples = [{"run": label, "prompt": p, "seed": 0, "reward": 0.5} for label in splats for p in prompts]
    evaluation = Evaluation([RunSpec("base"), RunSpec("tuned", lora=out / "lora")], prompts, [0], "pixels",
                            samples, {label: {"reward": (0.5, 0.1)} for label in splats}, pictures, [])
    return write_report(evaluation, out, splats=splats, viewer_gaussians=viewer_gaussians)


def test_report_without_splats_has_no_viewer_and_splat_labels_must_match(tmp_path):
    index = report_with_viewers(tmp_path / "with")
    html = index.read_text()
    assert html.count("<canvas class='splat-viewer'") == 4 and "viewer/splat-viewer.js" in html
    for name in ["viewer/splat-viewer.js", "viewer/LICENSE", "viewer/splats_000.js", "viewer/splats_001.js"]:
        assert (tmp_path / "with" / name).is_file(), name
    data = (tmp_path / "with" / "viewer" / "splats_000.js").read_text()
    assert 'window.R2D3_SPLATS["000/0"] = {"count": ' in data and '"000/1"' in data
    assert "Gaussians)" not in html  # every visible Gaussian is drawn
    html = report_with_viewers(tmp_path / "few", viewer_gaussians=500).read_text()
    assert "base (500 of 1,328 visible Gaussians, enlarged to cover)" in html

    evaluation = Evaluation([RunSpec("base")], ["a red cube"], [0], "pixels",
                            [{"run": "base", "prompt": "a red cube", "seed": 0, "reward": 0.5}],
                            {"base": {"reward": (0.5, float("nan"))}}, {"base": torch.rand(1, 4, 3, 8, 8)}, [])
    html = write_report(evaluation, tmp_path / "without").read_text()
    assert "splat-viewer" not in html and not (tmp_path / "without" / "viewer").exists()
    with pytest.raises(ValueError, match=r"splats are labelled \['tuned'\], expected the runs \['base'\]"):
        write_report(evaluation, tmp_path / "bad", splats={"tuned": ground_truth_splats(["a red cube"])})


class Chromium:
    """Headless Chromium driven over the DevTools protocol through ``--remote-debugging-pipe``
    (the browser reads NUL-terminated JSON commands on fd 3 and answers on fd 4): no client library."""

    def __init__(self, binary: str, profile: Path, log: Path):
        flags = ["--headless=new", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", "about:blank"]
        self.log = log.open("wb")
        # sh moves our stdin/stdout pipes to fds 3 and 4, where Chromium expects them.
        self.process = subprocess.Popen(["sh", "-c", 'exec "$@" 3<&0 4>&1 </dev/null 1>&2', "sh", binary, *flags],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buffer = b""
        while chunk := self.process.stdout.read1(1 << 16):
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            for message in complete:
                self.messages.put(json.loads(message))

    def send(self, method: str, page: str | None = None, timeout: float = 60, **params) -> dict:
        """Run ``method`` in the browser, or in the attached page whose protocol id is ``page``."""
        self.next_id += 1
        command = {"id": self.next_id, "method": method, "params": params}
        if page:
            command["sessionId"] = page  # the protocol's name for an attached target's channel
        self.process.stdin.write(json.dumps(command).encode() + b"\0")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no answer to {method} within {timeout} s") from None
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions the page reported so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text"))
            elif event.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def close(self):
        self.process.kill()
        self.process.wait()
        self.log.close()


class Page:
    def __init__(self, browser: Chromium):
        self.browser = browser
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        self.page_id = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, self.page_id, **params)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if value := self.evaluate(expression):
                    return value
            except RuntimeError:  # the page is between documents while it navigates
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} still false after {timeout} s; page errors: {self.browser.errors()}")
            time.sleep(0.1)

    def frames(self) -> list[int]:
        return self.evaluate("[...document.querySelectorAll('canvas.splat-viewer')].map(c => +(c.dataset.frames || 0))")

    def canvases(self) -> list[np.ndarray]:
        """Each viewer canvas as it is on screen, (H, W, 3) uint8, from one screenshot of the page."""
        # The viewport as tall as the page: every canvas on screen, page and viewport coordinates equal.
        height = self.evaluate("document.documentElement.scrollHeight")
        if height != self.evaluate("window.innerHeight"):
            self.send("Emulation.setDeviceMetricsOverride", width=1200, height=height, deviceScaleFactor=1,
                      mobile=False)
        self.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        boxes = self.evaluate("[...document.querySelectorAll('canvas.splat-viewer')].map(c => "
                              "{const r = c.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]})")
        shot = Image.open(io.BytesIO(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])))
        shot = np.asarray(shot.convert("RGB"))
        inset = 3  # inside the 1 px border
        return [shot[round(top) + inset: round(bottom) - inset, round(left) + inset: round(right) - inset]
                for left, top, right, bottom in boxes]

    def drag(self, x: float, y: float, dx: float, dy: float):
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
        for step in range(1, 5):
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x + dx * step / 4, y=y + dy * step / 4,
                      button="left", buttons=1)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x + dx, y=y + dy, button="left", buttons=0,
                  clickCount=1)


def object_pixels(canvas: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels that are not the viewer's background."""
    return np.abs(canvas.astype(int) - BACKGROUND).max(-1) > 30


def dominant(canvas: np.ndarray, channels: list[int]) -> float:
    """Fraction of the canvas whose colour is led by ``channels`` (e.g. [0] red, [0, 1] yellow)."""
    c = canvas.astype(int)
    others = [k for k in range(3) if k not in channels]
    lead = np.min(c[..., channels], axis=-1) - np.max(c[..., others], axis=-1)
    return float((object_pixels(canvas) & (lead > 60)).mean())


@pytest.fixture
def chromium(tmp_path):
    binary = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    if binary is None:
        reason = ("headless Chromium is needed to test the report's 3D viewer and is not installed; "
                  "install it with `apt-get install -y chromium` (as root)")
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this fails instead of skipping)")
        pytest.skip(reason)
    browser = Chromium(binary, tmp_path / "profile", tmp_path / "chromium.log")
    yield browser
    browser.close()


def test_report_viewers_draw_the_objects_in_headless_chromium_from_disk(chromium, tmp_path):
    index = report_with_viewers(tmp_path / "report")
    page = Page(chromium)
    page.send("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
    page.send("Page.navigate", url=index.as_uri())  # file://: no server, no network
    state = page.wait_for("['ready', 'error'].includes(document.documentElement.dataset.splatViewers) && "
                          "document.documentElement.dataset.splatViewers")
    assert state == "ready" and chromium.errors() == [], (state, chromium.errors())
    assert page.frames() == [1, 1, 1, 1]

    # Each canvas shows its object in its colour, near the middle (the camera orbits its centre).
    canvases = page.canvases()
    colours = {"red cube": [0], "blue cylinder": [2], "green torus": [1], "yellow cone": [0, 1]}
    for canvas, (name, channels) in zip(canvases, colours.items()):
        drawn = object_pixels(canvas)
        assert 0.05 < drawn.mean() < 0.9, (name, drawn.mean())
        assert dominant(canvas, channels) > 0.8 * drawn.mean(), name
        rows, cols = np.nonzero(drawn)
        height, width = drawn.shape
        assert abs(rows.mean() / height - 0.5) < 0.15 and abs(cols.mean() / width - 0.5) < 0.15, name

    # Dragging the red cube orbits both views of that prompt, not the other prompt's.
    box = page.evaluate("(r => [r.left + r.width / 2, r.top + r.height / 2])"
                        "(document.querySelector('canvas.splat-viewer').getBoundingClientRect())")
    page.drag(*box, 90, 40)
    page.wait_for("document.querySelectorAll('canvas.splat-viewer')[1].dataset.frames > 1")
    frames = page.frames()
    assert frames[0] > 1 and frames[1] == frames[0] and frames[2:] == [1, 1], frames
    turned = page.canvases()
    for before, after in zip(canvases[:2], turned[:2]):
        assert (object_pixels(before) != object_pixels(after)).mean() > 0.01  # a new silhouette
    assert all(np.array_equal(a, b) for a, b in zip(canvases[2:], turned[2:]))

    # Scrolling down on the torus zooms out of both views of the second prompt.
    x, y = page.evaluate("(r => [r.left + r.width / 2, r.top + r.height / 2])"
                         "(document.querySelectorAll('canvas.splat-viewer')[2].getBoundingClientRect())")
    page.send("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=400)
    page.wait_for("document.querySelectorAll('canvas.splat-viewer')[3].dataset.frames > 1")
    zoomed = page.canvases()
    for before, after in zip(turned[2:], zoomed[2:]):
        assert object_pixels(after).mean() < 0.6 * object_pixels(before).mean()  # exp(0.4) x the distance
    assert chromium.errors() == []
