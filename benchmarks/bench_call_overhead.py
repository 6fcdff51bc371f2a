"""What one call costs with no compute: a plain Ray actor against a Serve deployment handle.

The reward plane's handle path adds a fixed 11-16 ms per request over in-process scoring on
cpu-2core (bench_rewards.py). This separates what the transport itself costs from what the
plane's code adds: a method that only returns its argument, called from a synchronous driver

- without payload, as a plain Ray actor, through a Serve handle, and through a handle with
  ``_by_reference=True`` and an ``ObjectRef`` argument (how ``ServedRewards`` calls the rewards):
  Serve's own per-call cost (router, replica dispatch, their thread hops);
- with a reward request's payload, float32 images of --payload-mb put in the object store and
  the same bytes returned (what a gradient of the same shape costs), as a plain Ray actor and
  through the by-reference handle: the least any reward request through Ray's object store, and
  through Serve, can add on this machine, to hold against the copy floor (the request's bytes,
  in and out, copied once at this machine's memory bandwidth).

Results and what they show: benchmarks/README.md.

Usage: ``python benchmarks/bench_call_overhead.py [--calls 200] [--payload-mb 12.58] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

WARM_UP_CALLS = 20


def timed(call, calls: int) -> dict:
    for _ in range(WARM_UP_CALLS):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)), "calls": calls}


def run(calls: int, payload_bytes: int) -> dict:
    import ray
    from ray import serve

    from bench_rewards import copy_bandwidth  # the floor as the reward benchmark measures it

    # The workers at the driver's priority, as bench_rewards.py runs them (Ray starts them niced).
    os.environ["RAY_worker_niceness"] = "0"
    # A small object store, as in bench_rewards.py: the payload rows reach the steady state (every
    # store page mapped in both processes) within the warm-up instead of faulting fresh pages in.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    try:
        @ray.remote
        class Echo:
            def echo(self, x):
                return x

        @serve.deployment(logging_config={"enable_access_log": False})
        class EchoDeployment:
            def echo(self, x):
                return x

        actor = Echo.remote()
        handle = serve.run(EchoDeployment.bind(), name="call-overhead", route_prefix=None)
        by_reference, argument = handle.options(_by_reference=True), ray.put(0)
        # The images of one request; the echo returns them, a new object of the gradient's size.
        images = np.random.default_rng(0).random(payload_bytes // 4, dtype=np.float32)
        anchor = ray.put(np.zeros(1, np.float32))  # keeps the object store mapped in this process, as the client does
        rows = {
            "Ray actor call": timed(lambda: ray.get(actor.echo.remote(0)), calls),
            "Serve handle": timed(lambda: handle.echo.remote(0).result(), calls),
            "Serve handle, by reference": timed(lambda: by_reference.echo.remote(argument).result(), calls),
            "Ray actor call, payload in and out": timed(lambda: ray.get(actor.echo.remote(ray.put(images))), calls),
            "Serve handle, by reference, payload in and out":
                timed(lambda: by_reference.echo.remote(ray.put(images)).result(), calls),
        }
        del anchor
        serve.shutdown()
    finally:
        ray.shutdown()
    floor = 1e3 * 2 * payload_bytes / copy_bandwidth()  # ms to copy the request's bytes, in and out, once
    return {"rows": rows, "payload_bytes": payload_bytes, "copy_floor_ms": floor, "target_ms": 3 * floor,
            "machine": platform.node(), "cpu_count": os.cpu_count(), "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def print_table(report: dict) -> None:
    mb = report["payload_bytes"] / 1e6
    print(f"payload: {mb:.1f} MB in and {mb:.1f} MB out; {report['cpu_count']} CPUs, ray {report['ray']}")
    print("| call (no compute) | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name, row in report["rows"].items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} |")
    print(f"copy floor ({2 * mb:.1f} MB copied once): {report['copy_floor_ms']:.2f} ms; "
          f"3x the floor: {report['target_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per path (default 200)")
    parser.add_argument("--payload-mb", type=float, default=16 * 3 * 256 * 256 * 4 / 1e6,
                        help="megabytes each way in the payload rows (default 12.58: 16 views x 3 x 256^2 float32)")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.calls < 2:
        parser.error(f"--calls {args.calls}: expected at least 2")
    if not args.payload_mb > 0:
        parser.error(f"--payload-mb {args.payload_mb}: expected a positive size")
    report = run(args.calls, int(args.payload_mb * 1e6) // 4 * 4)
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
