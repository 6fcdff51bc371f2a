import numpy as np
import pytest
import torch

from r2d3ray.splats import SH_C0, Splats, load_ply, save_ply

PROPS = "x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3".split()


def random_splats(N=50, seed=0) -> Splats:
    g = torch.Generator().manual_seed(seed)
    return Splats(
        means=torch.randn(1, N, 3, generator=g),
        quats=torch.randn(1, N, 4, generator=g),
        scales=torch.rand(1, N, 3, generator=g) * 0.02 + 5e-4,
        opacities=torch.rand(1, N, generator=g),
        colors=torch.rand(1, N, 3, generator=g),
    )


def write_ply(path, header_lines, body: bytes):
    path.write_bytes(("\n".join(header_lines) + "\n").encode("ascii") + body)


def test_round_trip(tmp_path):
    s = random_splats()
    save_ply(tmp_path / "a.ply", s)
    back = load_ply(tmp_path / "a.ply")
    assert back.batch_size == 1 and back.num_gaussians == 50 and back.means.dtype == torch.float32
    assert torch.equal(back.means, s.means) and torch.equal(back.quats, s.quats)
    assert torch.allclose(back.scales, s.scales, rtol=1e-6, atol=0)
    assert torch.allclose(back.opacities, s.opacities, atol=1e-6)
    assert torch.allclose(back.colors, s.colors, atol=1e-6)


def test_file_is_standard_3dgs_layout(tmp_path):
    s = random_splats(N=9)
    s.opacities[0, :2] = torch.tensor([0.0, 1.0])
    save_ply(tmp_path / "a.ply", s)
    data = (tmp_path / "a.ply").read_bytes()
    header, body = data.split(b"end_header\n")
    assert header.decode().splitlines() == [
        "ply", "format binary_little_endian 1.0", "element vertex 9", *[f"property float {p}" for p in PROPS]
    ]  # fmt: skip
    rec = np.frombuffer(body, dtype=[(p, "<f4") for p in PROPS])
    assert len(rec) == 9 and not rec["nx"].any()
    assert np.allclose(rec["f_dc_1"], (s.colors[0, :, 1].numpy() - 0.5) / SH_C0, atol=1e-5)
    assert np.allclose(rec["scale_2"], np.log(s.scales[0, :, 2].numpy()), atol=1e-5)
    assert np.array_equal(rec["rot_0"], s.quats[0, :, 0].numpy())
    # opacity is a logit; 0 and 1 are clamped to 1e-6 / 1 - 1e-6 first so it stays finite
    assert np.isfinite(rec["opacity"]).all()
    assert np.allclose(1 / (1 + np.exp(-rec["opacity"][2:])), s.opacities[0, 2:].numpy(), atol=1e-6)
    back = load_ply(tmp_path / "a.ply")
    assert torch.allclose(back.opacities[0, :2], torch.tensor([1e-6, 1 - 1e-6]), atol=1e-7)


def test_extra_properties_are_ignored(tmp_path):
    # a file as the 3DGS trainers write it: SH degree 1 (f_rest_0..8), plus an unrelated uchar
    props = PROPS[:9] + [f"f_rest_{k}" for k in range(9)] + PROPS[9:] + ["label"]
    dtype = [(p, "<f4") for p in props[:-1]] + [("label", "u1")]
    rec = np.zeros(3, dtype=dtype)
    rec["x"], rec["f_dc_0"], rec["f_rest_4"] = [1, 2, 3], [0, 1, -1], 7
    rec["opacity"], rec["scale_1"], rec["rot_0"], rec["label"] = 0.0, np.log(0.01), 1.0, 5
    types = ["float"] * (len(props) - 1) + ["uchar"]
    header = ["ply", "format binary_little_endian 1.0", "comment made by hand", "element vertex 3"]
    header += [f"property {t} {p}" for t, p in zip(types, props)] + ["end_header"]
    write_ply(tmp_path / "b.ply", header, rec.tobytes())
    with pytest.warns(UserWarning, match="f_rest"):
        s = load_ply(tmp_path / "b.ply")
    assert torch.equal(s.means[0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(s.colors[0, :, 0], torch.tensor([0.5, 0.5 + SH_C0, 0.5 - SH_C0]))
    assert torch.allclose(s.opacities, torch.full((1, 3), 0.5))
    assert torch.allclose(s.scales[0, :, 1], torch.full((3,), 0.01))


def good_header(n=2, props=PROPS, fmt="binary_little_endian 1.0"):
    return ["ply", f"format {fmt}", f"element vertex {n}"] + [f"property float {p}" for p in props] + ["end_header"]


@pytest.mark.parametrize(
    "header, body_len, match",
    [
        (["plx"] + good_header()[1:], 2 * 68, "no 'ply'"),
        (good_header(fmt="ascii 1.0"), 2 * 68, "format 'ascii 1.0' is not supported"),
        (good_header(fmt="binary_big_endian 1.0"), 2 * 68, "binary_big_endian"),
        (good_header(props=PROPS[:-1]), 2 * 64, r"missing.*rot_3"),
        (good_header(), 2 * 68 - 5, "truncated"),
        (good_header()[:3] + ["property list uchar int ids"] + good_header()[3:], 2 * 68, "unsupported property"),
        (good_header()[:-1] + ["element face 1", "end_header"], 2 * 68, "unsupported element"),
        (good_header()[:-1], 2 * 68, "end_header"),
    ],
)
def test_malformed_ply_raises(tmp_path, header, body_len, match):
    write_ply(tmp_path / "bad.ply", header, bytes(body_len))
    with pytest.raises(ValueError, match=match) as err:
        load_ply(tmp_path / "bad.ply")
    assert "binary_little_endian" in str(err.value)  # the message states the expected format


def test_save_rejects_bad_splats(tmp_path):
    one = random_splats()
    two = Splats(*(torch.cat([t, t]) for t in (one.means, one.quats, one.scales, one.opacities, one.colors)))
    with pytest.raises(ValueError, match="B=1"):
        save_ply(tmp_path / "x.ply", two)
    neg = random_splats()
    neg.scales[0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="scales must be positive"):
        save_ply(tmp_path / "x.ply", neg)
    nan = random_splats()
    nan.colors[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="Splats.colors"):
        save_ply(tmp_path / "x.ply", nan)
