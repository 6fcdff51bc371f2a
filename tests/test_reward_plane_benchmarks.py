"""The reward-plane benchmarks run as their documentation says (`python benchmarks/NAME.py`), at their
smallest sizes: each starts its own local Ray in a subprocess, checks the served answers against the
in-process ones (bench_rewards.py does so in its warm-up), prints its table and writes its JSON.
Their figures are not judged here; they are recorded in benchmarks/README.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    return done.stdout


@pytest.mark.slow
def test_bench_rewards_serves_the_in_process_answer_and_reports_the_handle_overhead(tmp_path):
    out = tmp_path / "rewards.json"
    printed = run_script("bench_rewards.py", "--quick", "--modes", "handle", "--width", "4", "--size", "64",
                         "--out", str(out))
    report = json.loads(out.read_text())
    rows = {row["mode"]: row for row in report["results"]}
    assert set(rows) == {"in-process", "handle"}
    assert rows["handle"]["payload_bytes"] == 2 * 4 * 4 * 3 * 64 * 64 * 4  # images in, float32 gradient out
    assert math.isfinite(rows["handle"]["overhead_ms"]) and report["floor_ms"] > 0
    assert "handle" in printed and "floor" in printed


@pytest.mark.slow
def test_bench_call_overhead_times_every_path_against_the_copy_floor(tmp_path):
    out = tmp_path / "calls.json"
    printed = run_script("bench_call_overhead.py", "--calls", "3", "--payload-mb", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"Ray actor call", "Serve handle", "Serve handle, by reference",
                                   "Ray actor call, payload in and out",
                                   "Serve handle, by reference, payload in and out"}
    assert all(row["p50_ms"] > 0 and row["calls"] == 3 for row in report["rows"].values())
    assert report["payload_bytes"] == 1_000_000 and report["target_ms"] == pytest.approx(3 * report["copy_floor_ms"])
    assert "3x the floor" in printed
