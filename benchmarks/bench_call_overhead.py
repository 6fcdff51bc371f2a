"""The fixed cost of one call without payload: a plain Ray actor against a Serve deployment handle.

The reward plane's handle path adds a fixed 14-16 ms per request over in-process scoring on
cpu-2core (bench_rewards.py). This separates the part that is Serve's own (router, replica
dispatch, their thread hops) from the part that goes with the payload: the same no-op method,
returning its argument, called from a synchronous driver as a plain Ray actor, through a Serve
handle, and through a handle with ``_by_reference=True`` and an ``ObjectRef`` argument (how
``ServedRewards`` calls the rewards). Results and what they show: benchmarks/README.md.

Usage: ``python benchmarks/bench_call_overhead.py [--calls 200] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
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


def run(calls: int) -> dict:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
        rows = {
            "Ray actor call": timed(lambda: ray.get(actor.echo.remote(0)), calls),
            "Serve handle": timed(lambda: handle.echo.remote(0).result(), calls),
            "Serve handle, by reference": timed(lambda: by_reference.echo.remote(argument).result(), calls),
        }
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"rows": rows, "machine": platform.node(), "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def print_table(report: dict) -> None:
    print("| call (no payload) | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name, row in report["rows"].items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per path (default 200)")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.calls < 2:
        parser.error(f"--calls {args.calls}: expected at least 2")
    report = run(args.calls)
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
