"""A cluster rehearsal on one machine: a real multi-node Ray cluster, the reward plane and two
training jobs submitted through the Jobs API, a trainer node and a reward replica killed mid-run.

    python benchmarks/cluster_rehearsal.py [--quick] [--out rehearsal.json] [--workdir DIR]
    make cluster-rehearsal

What it starts, all on this machine:

- a Ray cluster of three nodes, each its own raylet and object store: `ray start --head` (the
  "head" node: the GCS, the dashboard and the jobs' drivers), then `ray start --address` twice:
  the reward node (custom resource `reward_node`) and a trainer node (custom resource
  `trainer_node`). Every port is chosen free, and the cluster's temporary directory is its own;
- an MLflow tracking server (`mlflow server`) whose backend store and artifact root lie in the
  shared directory, beside the checkpoints (`$R2D3RAY_STORAGE_PATH`).

Then, through `ray job submit` (the jobs get the tracking server and the storage path from their
runtime env, a copy of jobs/runtime_env.yaml with those variables set):

1. the reward-plane job (`jobs/serve_rewards.py`): its deployments carry
   `resources: {reward_node: 0.01}` in the reward app config, so every replica lands on the reward node;
2. a reward request between nodes (16 views x 3 x 256^2 with gradients, client on the trainer node,
   replica on the reward node) beside the same request from a client on the reward node, and the
   copy floor (the request's bytes copied once at this machine's memory bandwidth);
3. two training jobs at once (`jobs/train.py`, Nabla-R2D3 and DiffusionNFT on the embedded default,
   one worker each), which attach to the running app and log to the MLflow server. The head's and
   the reward node's CPUs are held back until the trainer node is stopped, so both runs start there;
4. once both runs have a checkpoint, while they train: a stream of reward requests starts (a
   client on the head keeping several in flight) and one `color_match` replica is killed; Serve
   restarts it, the clients re-send what the dead replica held, and no request is lost;
5. right after, the trainer node is stopped (its raylet and every process under it killed): Ray
   Train restarts each worker group on a surviving node, which resumes from the run's last
   checkpoint and continues the same MLflow run;
6. at the end: the app answers by handle and over HTTP, and the MLflow server holds both runs with
   every epoch's metrics exactly once, their pictures and their artifacts.

It prints a table of what it checked and the figures (request times, resume time, epochs redone,
requests retried), writes them as JSON to `--out`, and always tears its cluster down: it kills the
processes of its own cluster (found by its temporary directory and GCS port) and the MLflow server,
never `ray stop`, which would stop every Ray instance on the machine. `--quick` is the short form
`make test` runs (tests/test_cluster_rehearsal.py); the full form trains longer and times more
requests (benchmarks/README.md records its figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import yaml

# `ray start` turns token authentication on; Ray's clients (the CLI, the Jobs SDK, ray.init) send
# the token (~/.ray/auth_token) only in this mode, which Ray reads when it is imported.
os.environ["RAY_AUTH_MODE"] = "token"
# After that (it imports Ray). This script's folder is sys.path[0], and Ray hands the driver's path to
# its actors: the port picker and the copy floor are the reward-plane benchmark's.
from bench_rewards import copy_bandwidth, free_port  # noqa: E402
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray` and `mlflow` of this interpreter's environment
APP = "rewards"
EXPERIMENT = "r2d3ray-rehearsal"
BENCH_DEPLOYMENT = "convnet"  # bench_rewards.py's frozen conv net: real compute, ~115 ms a request
STREAM_DEPLOYMENT = "color_match"  # the reward the training jobs train on


@dataclass
class Sizes:
    """How long the rehearsal trains and how many requests it times."""

    epochs: int  # per training job
    measure_rounds: int  # rounds of (cross-node, one-node) blocks of timed requests
    measure_block: int
    stream_in_flight: int  # requests the stream keeps in flight
    stream_after_kill: int  # requests answered after the kill before the stream stops


QUICK = Sizes(epochs=8, measure_rounds=2, measure_block=3, stream_in_flight=4, stream_after_kill=8)
FULL = Sizes(epochs=12, measure_rounds=6, measure_block=5, stream_in_flight=4, stream_after_kill=40)


def wait_for(what: str, predicate, timeout_s: float, period_s: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s:g} s")
        time.sleep(period_s)


def failure_excerpt(log: str, lines: int = 60) -> str:
    """The end of a failed job's log from its last traceback on (at most ``lines`` lines), indented."""
    tail = log.splitlines()
    start = max((i for i, line in enumerate(tail) if "Traceback" in line), default=len(tail) - lines)
    return "\n".join("    | " + line for line in tail[max(start, len(tail) - lines, 0):])


def kill_tree(processes: list[psutil.Process]) -> int:
    """SIGKILL the processes and everything under them; the number killed."""
    everyone = {}
    for proc in processes:
        try:
            everyone[proc.pid] = proc
            everyone.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for proc in everyone.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(everyone.values()), timeout=10)
    return len(everyone)


# ---------------------------------------------------------------------------------- the cluster


# `ray start`, with the folder of the node's runtime environments (unpacked working directories)
# named per node: nodes on one machine share the cluster's session folder, and a node that unpacks
# a job's working directory first deletes the copy at that path, under the feet of processes of other
# nodes that run from it. Separate machines have separate folders; the CLI has no option for it.
RAY_START = [sys.executable, "-c", "import sys; import ray._private.ray_constants as constants; "
             "constants.DEFAULT_RUNTIME_ENV_DIR_NAME = sys.argv.pop(1); from ray.scripts.scripts import main; "
             "sys.argv[0] = 'ray'; main()"]


@dataclass
class Node:
    name: str
    num_cpus: int
    resources: dict[str, float]
    node_manager_port: int = field(default_factory=free_port)
    node_id: str = ""


class Cluster:
    """Ray nodes on this machine started with `ray start`, stopped by killing their own processes."""

    def __init__(self, temp_dir: Path, log_dir: Path):
        self.temp_dir, self.log_dir = temp_dir, log_dir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: dict[str, Node] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_node(self, node: Node, head: bool = False, tries: int = 2) -> None:
        """`ray start` one node. Ray gives a raylet 30 s to register with the GCS; on a loaded machine
        that can pass, so a node that did not come up is cleared away and started again."""
        for attempt in range(1, tries + 1):
            ports = {  # a node's own ports: the defaults of several nodes on one machine would collide
                "--node-manager-port": node.node_manager_port, "--object-manager-port": free_port(),
                "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
            }
            command = [*RAY_START, f"runtime_resources_{node.name}", "start", "--node-ip-address", "127.0.0.1",
                       "--num-cpus", str(node.num_cpus), "--resources", json.dumps(node.resources),
                       "--object-store-memory", str(512 * 2**20), "--disable-usage-stats",
                       *(str(x) for item in ports.items() for x in item)]
            if not head:  # the nodes share the head's log folder, which the head's log monitor already follows
                command += ["--include-log-monitor", "false"]
            if head:
                command += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                            "--temp-dir", str(self.temp_dir)]
            else:
                command += ["--address", self.address]
            log = self.log_dir / f"ray_start_{node.name}.log"
            with log.open("a") as out:
                # The jobs' `python` is the one on the nodes' PATH: this environment's, as on a cluster image.
                # No memory monitor: each node here would take the whole machine's memory, other
                # programs' included, for its own and kill the rehearsal's workers for it.
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=300,
                                      env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                           "RAY_memory_monitor_refresh_ms": "0"})
            if done.returncode == 0:
                self.nodes[node.name] = node
                return
            if head or attempt == tries:
                raise RuntimeError(f"`ray start` of node {node.name} failed (exit {done.returncode}); see {log}")
            kill_tree([p for p in self.processes()
                       if f"--node_manager_port={node.node_manager_port}" in (p.info["cmdline"] or [])])
            node.node_manager_port = free_port()

    def processes(self) -> list[psutil.Process]:
        """This cluster's daemons (GCS, raylets, dashboard, agents, monitors): their command lines name
        its temporary directory or its GCS port. Workers run under the raylets."""
        markers = (str(self.temp_dir), f":{self.gcs_port}")
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] not in mine and any(marker in line for marker in markers):
                found.append(proc)
        return found

    def raylet(self, name: str) -> psutil.Process:
        flag = f"--node_manager_port={self.nodes[name].node_manager_port}"
        for proc in self.processes():
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].endswith("raylet") and flag in cmdline:
                return proc
        raise RuntimeError(f"no raylet of node {name} (node manager port {self.nodes[name].node_manager_port})")

    def kill_node(self, name: str) -> int:
        """The node dies as a machine would: its raylet and every process under it (workers, agents)."""
        return kill_tree([self.raylet(name)])

    def stop(self) -> int:
        return kill_tree(self.processes())


class MLflowServer:
    """`mlflow server` with its backend store and artifact root in ``root``."""

    def __init__(self, root: Path, log: Path):
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        # Its own process group: the server's workers go down with it.
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # No job runner and its task queues beside the server: the rehearsal uses none, and they take cores.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        import urllib.request

        if self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.log.name}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.log.close()


# ---------------------------------------------------------------------------------- jobs


class Jobs:
    """Submits with `ray job submit` (the CLI users run); follows the jobs with the Jobs SDK."""

    def __init__(self, cluster: Cluster, runtime_env_file: Path, log_dir: Path):
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.runtime_env_file, self.log_dir = cluster, runtime_env_file, log_dir
        self.client = JobSubmissionClient(cluster.dashboard)

    def submit(self, submission_id: str, *entrypoint: str) -> str:
        command = [str(BIN / "ray"), "job", "submit", "--address", self.cluster.dashboard, "--no-wait",
                   "--submission-id", submission_id, "--working-dir", str(REPO),
                   "--runtime-env", str(self.runtime_env_file), "--", *entrypoint]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"`ray job submit` {submission_id} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return submission_id

    def status(self, submission_id: str) -> str:
        return str(self.client.get_job_status(submission_id).value)

    def wait(self, submission_id: str, timeout_s: float) -> str:
        status = wait_for(f"job {submission_id} to end",
                          lambda: (s := self.status(submission_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                          timeout_s, period_s=1.0)
        self.save_logs(submission_id)
        return status

    def job_id(self, submission_id: str) -> str | None:
        return self.client.get_job_info(submission_id).job_id

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def save_logs(self, submission_id: str) -> Path:
        path = self.log_dir / f"{submission_id}.log"
        path.write_text(self.logs(submission_id))
        return path


def runtime_env(shared: Path, mlflow_uri: str, ray_address: str) -> dict:
    """jobs/runtime_env.yaml with the tracking server and the shared checkpoint storage set."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["env_vars"] = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": mlflow_uri,
                       "R2D3RAY_STORAGE_PATH": str(shared / "storage"),
                       # Ray Train's helper actors look for "the" cluster of this machine, which here
                       # (several nodes, maybe other Ray instances) needs naming.
                       "RAY_ADDRESS": ray_address,
                       # Every worker's progress line in the job's log: Ray otherwise folds lines that differ
                       # only in their numbers ("epoch 2/3" and "epoch 3/3") into one.
                       "RAY_DEDUP_LOGS": "0"}
    return env


def reward_app(http_port: int) -> dict:
    """The embedded default's reward for the trainers (two replicas) and the benchmark's conv net,
    every replica placed on the reward node by its custom resource."""
    on_reward_node = {"num_cpus": 0, "resources": {"reward_node": 0.01}, "batch_wait_timeout_s": 0}
    return {
        "app_name": APP,
        "deployments": [
            {"name": STREAM_DEPLOYMENT, "reward": "color_match", "num_replicas": 2, **on_reward_node},
            # Imported by the replica from the job's working directory (benchmarks/ is on its path as a namespace).
            {"name": BENCH_DEPLOYMENT, "reward": "benchmarks.bench_rewards:bench_convnet", **on_reward_node},
        ],
        "http": {"port": http_port, "max_body_mb": 1024},
    }


def training_overrides(name: str, algorithm: str, shared: Path, app_config: Path, epochs: int) -> list[str]:
    """The embedded default (committed tiny prior, color_match) at the smallest sizes, one worker."""
    sets = [
        f"name={name}", f"output_dir={shared / 'outputs'}", f"rewards.app_config={app_config}",
        f"algorithm.name={algorithm}", "algorithm.nft.group_size=2", "algorithm.nabla.trajectories=fresh",
        "sampling.num_steps=4", "sampling.batch_size=2", "sampling.num_batches_per_epoch=1", "render.size=32",
        "training.num_workers=1", f"training.epochs={epochs}", "training.checkpoint_every=1",
        "training.gradient_accumulation_steps=2", "training.micro_batch_size=1", "training.max_failures=3",
        f"tracking.experiment={EXPERIMENT}",
    ]
    return [arg for value in sets for arg in ("--set", value)]


# ---------------------------------------------------------------------------------- clients on the cluster


class RewardClient:
    """A trainer-side reward client placed on one node (a Ray actor): timed requests, and a stream
    of requests in the background that counts how often each had to be sent."""

    def __init__(self, app_name: str):
        import torch

        torch.set_num_threads(1)
        self.app_name = app_name
        self._stream: dict = {}
        self._stop = threading.Event()

    def timed_requests(self, deployment: str, batch: int, num_views: int, size: int, calls: int) -> list[float]:
        """Seconds of each of ``calls`` requests of (batch, num_views, 3, size, size) with gradients, after one untimed."""
        import torch

        from r2d3ray.rewards.combiner import RewardCombiner
        from r2d3ray.serve.client import ServedRewards

        client = ServedRewards(self.app_name, RewardCombiner({deployment: 1.0}))
        views = {"images": torch.rand(batch, num_views, 3, size, size, generator=torch.Generator().manual_seed(0))}
        prompts = ["a red cube"] * batch
        client.submit(views, prompts).result()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            answer = client.submit(views, prompts).result()
            times.append(time.perf_counter() - start)
            assert answer.grads is not None and answer.grads.shape == views["images"].shape
        return times

    def copy_floor_s(self, nbytes: int) -> float:
        return nbytes / copy_bandwidth()

    def start_stream(self, deployment: str, in_flight: int, size: int) -> None:
        self._stop.clear()
        self._stream = {"sent": 0, "answered": 0, "retried": 0, "most_attempts": 1, "errors": []}
        threading.Thread(target=self._run_stream, args=(deployment, in_flight, size), daemon=True).start()

    def _run_stream(self, deployment: str, in_flight: int, size: int) -> None:
        import torch

        from r2d3ray.rewards.combiner import RewardCombiner
        from r2d3ray.serve.client import ServedRewards

        stats = self._stream
        # A short backoff: the replica's restart, not the client's patience, should set how long a retry takes.
        client = ServedRewards(self.app_name, RewardCombiner({deployment: 1.0}), timeout_s=30.0, retry_budget_s=120.0,
                               backoff_s=0.2)
        views = {"images": torch.rand(2, 4, 3, size, size, generator=torch.Generator().manual_seed(1))}
        prompts = ["a red cube", "a blue sphere"]
        while not self._stop.is_set():
            pending = [client.submit(views, prompts) for _ in range(in_flight)]  # several requests in flight
            stats["sent"] += len(pending)
            for request in pending:
                try:
                    request.result()
                except Exception as err:  # a lost request: recorded, and the rehearsal fails on it
                    stats["errors"].append(f"{type(err).__name__}: {err}")
                    continue
                stats["answered"] += 1
                attempts = request.attempts[deployment]
                stats["retried"] += attempts > 1
                stats["most_attempts"] = max(stats["most_attempts"], attempts)

    def stream_stats(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._stream.items()}

    def stop_stream(self) -> dict:
        self._stop.set()
        wait_for("the request stream to stop", lambda: self._stream["sent"] == self._stream["answered"]
                 + len(self._stream["errors"]), timeout_s=180)
        return self.stream_stats()


class CapacityHold:
    """An idle actor that holds one CPU of a node (released by killing it)."""

    def ready(self) -> bool:
        return True


# ---------------------------------------------------------------------------------- the rehearsal


class Rehearsal:
    def __init__(self, args):
        self.args, self.sizes = args, (QUICK if args.quick else FULL)
        self.checks: list[tuple[str, bool, str]] = []
        self.figures: dict[str, float | int | str] = {}

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        print(f"  [{'ok' if ok else 'FAILED'}] {name}{': ' + detail if detail else ''}", flush=True)
        return bool(ok)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    def run(self) -> int:
        self.started = time.monotonic()
        work = Path(self.args.workdir or tempfile.mkdtemp(prefix="r2d3ray-rehearsal-"))
        self.shared, self.logs = work / "shared", work / "logs"
        for folder in (self.shared, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        # The temporary directory holds the nodes' sockets: short, for the 107-byte limit on their paths.
        self.cluster = Cluster(Path(tempfile.mkdtemp(prefix="r2d3ray-ray-")), self.logs)
        self.mlflow = MLflowServer(self.shared / "mlflow", self.logs / "mlflow_server.log")
        self.say(f"working directory {work}; MLflow server at {self.mlflow.uri}")
        try:
            self.rehearse()
        except (Exception, KeyboardInterrupt) as err:  # a failed check; the cluster still comes down below
            self.check("the rehearsal ran to the end", False, f"{type(err).__name__}: {err}")
        finally:
            self.teardown()
        self.report()
        return 0 if all(ok for _, ok, _ in self.checks) else 1

    def rehearse(self) -> None:
        import ray

        cluster = self.cluster
        # Head: the GCS, the dashboard and the jobs' drivers; each node's CPUs are what training may use.
        cluster.start_node(Node("head", 1, {"head_node": 1}), head=True)
        cluster.start_node(Node("reward", 1, {"reward_node": 1}))
        cluster.start_node(Node("trainer", 2, {"trainer_node": 1}))
        self.say(f"cluster up: 3 nodes, GCS {cluster.address}, dashboard {cluster.dashboard}")
        wait_for("the MLflow server", self.mlflow.ready, timeout_s=120)
        self.say("MLflow server up")
        # This driver's Ray calls (ray.init, the state API) go to this cluster, whatever else runs here.
        os.environ["RAY_ADDRESS"] = cluster.address

        ray.init(address=cluster.address, namespace="rehearsal", log_to_driver=False)
        from ray.util.state import list_nodes

        nodes = {n.node_id: n for n in list_nodes(filters=[("state", "=", "ALIVE")])}
        for node in cluster.nodes.values():
            node.node_id = next(i for i, n in nodes.items() if f"{node.name}_node" in (n.resources_total or {}))
        self.check("three nodes, each with its own raylet", len(nodes) == 3 and len({
            cluster.raylet(name).pid for name in cluster.nodes}) == 3, f"{len(nodes)} alive")

        env_file = self.shared / "runtime_env.yaml"
        env_file.write_text(yaml.safe_dump(runtime_env(self.shared, self.mlflow.uri, cluster.address)))
        self.app_file = self.shared / "rewards_rehearsal.yaml"
        self.http_port = free_port()
        self.app_file.write_text(yaml.safe_dump(reward_app(self.http_port), sort_keys=False))
        self.jobs = Jobs(cluster, env_file, self.logs)

        self.reward_plane()
        self.measure_requests()
        self.train_through_failures()
        self.final_checks()

    # -- 1. the reward plane
    def reward_plane(self) -> None:
        from ray.util.state import list_actors

        self.say("submitting the reward-plane job")
        job = self.jobs.submit("serve-rewards", "python", "jobs/serve_rewards.py", "--config", str(self.app_file))
        status = self.jobs.wait(job, timeout_s=300)
        if not self.check("reward-plane job (ray job submit jobs/serve_rewards.py)", status == "SUCCEEDED", status):
            raise RuntimeError(f"the reward-plane job {status}; see {self.logs / (job + '.log')}")
        rewards = {d["name"] for d in yaml.safe_load(self.app_file.read_text())["deployments"]}
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                    if (a.class_name or "").split(":")[-1] in rewards and a.class_name.startswith(f"ServeReplica:{APP}:")]
        reward_node = self.cluster.nodes["reward"].node_id
        self.check("every reward replica on the reward node (resources in the app config)",
                   len(replicas) == 3 and all(a.node_id == reward_node for a in replicas),
                   f"{len(replicas)} replicas of {', '.join(sorted(rewards))}")

    # -- 2. a request between nodes
    def measure_requests(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        s = self.sizes
        self.say("timing a reward request between nodes and on one node")
        Client = ray.remote(num_cpus=0, max_concurrency=4)(RewardClient)
        placed = lambda node: Client.options(  # noqa: E731
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.cluster.nodes[node].node_id, soft=False)).remote(APP)
        clients = {"cross-node": placed("trainer"), "one node": placed("reward")}
        batch, views, size = 4, 4, 256  # 16 views x 3 x 256^2, float32: 12.6 MB in, its gradient back
        times = {label: [] for label in clients}
        for _ in range(s.measure_rounds):  # taking turns: a drifting load falls on both alike
            for label, client in clients.items():
                times[label] += ray.get(client.timed_requests.remote(BENCH_DEPLOYMENT, batch, views, size,
                                                                     s.measure_block))
        moved = 2 * batch * views * 3 * size * size * 4
        floor = ray.get(clients["cross-node"].copy_floor_s.remote(moved))
        for label, values in times.items():
            key = label.replace(" ", "_").replace("-", "_")
            self.figures[f"request_{key}_p50_ms"] = round(1e3 * float(np.median(values)), 1)
            self.figures[f"request_{key}_p95_ms"] = round(1e3 * float(np.percentile(values, 95)), 1)
        self.figures["request_copy_floor_ms"] = round(1e3 * floor, 1)
        self.figures["request_mb_moved"] = round(moved / 1e6, 1)
        self.figures["request_cross_node_added_ms"] = round(
            self.figures["request_cross_node_p50_ms"] - self.figures["request_one_node_p50_ms"], 1)
        self.check("reward request between nodes answered with gradients",
                   len(times["cross-node"]) == s.measure_rounds * s.measure_block,
                   f"p50 {self.figures['request_cross_node_p50_ms']} ms cross-node, "
                   f"{self.figures['request_one_node_p50_ms']} ms one node, floor {self.figures['request_copy_floor_ms']} ms")
        for client in clients.values():
            ray.kill(client)

    # -- 3-5. training through a replica kill and a node failure
    def train_through_failures(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        s, cluster = self.sizes, self.cluster
        # Hold the head's and the reward node's CPU until the trainer node goes: both runs start there.
        Holder = ray.remote(num_cpus=1)(CapacityHold)
        holders = [Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            cluster.nodes[name].node_id, soft=False)).remote() for name in ("head", "reward")]
        ray.get([h.ready.remote() for h in holders])

        self.runs = {"nabla": "rehearsal-nabla", "nft": "rehearsal-nft"}
        self.say("submitting two training jobs: " + ", ".join(self.runs.values()))
        for algorithm, name in self.runs.items():
            self.jobs.submit(name, "python", "jobs/train.py", "--config", "configs/toy.yaml",
                             *training_overrides(name, algorithm, self.shared, self.app_file, s.epochs))
        # Both runs checkpointed and training on the trainer node: a stream of reward requests starts,
        # then the trainer node goes down and a reward replica with it, all at once.
        wait_for("both runs' first checkpoint", lambda: all(self.checkpoint_epoch(n) >= 1 for n in self.runs.values())
                 or self.any_job_ended(), timeout_s=900, period_s=0.5)
        stream = self.start_stream()
        workers_before = self.train_workers()
        at_kill = {name: (self.checkpoint_epoch(name), self.logged_epochs(name),
                          self.reported_epochs(name, workers_before[name][1]) if name in workers_before else [])
                   for name in self.runs.values()}
        running = [name for name in self.runs.values() if self.jobs.status(name) == "RUNNING"]
        replica_killed = self.kill_replica_mid_stream(stream)  # while both runs request rewards
        for holder in holders:
            ray.kill(holder)
        trainer_node = cluster.nodes["trainer"].node_id
        self.say(f"stopping the trainer node (checkpoint epochs {', '.join(f'{n} {at_kill[n][0]}' for n in running)})")
        killed_at = time.monotonic()
        killed = cluster.kill_node("trainer")
        # A checkpoint being written while the node went down may have completed after the count above.
        newest_at_kill = {name: self.checkpoint_epoch(name) for name in running}
        self.check("trainer node stopped mid-run", len(running) == len(self.runs) and killed > 0,
                   f"{killed} processes; runs training there: {', '.join(running) or 'none'} "
                   f"({len(workers_before)} workers, all there: {all(n == trainer_node for n, _ in workers_before.values())})")
        self.finish_stream(stream, *replica_killed)

        resumed, new_workers = {}, {}

        def watch_resume():
            for name, (node, pid) in self.train_workers().items():
                if name in running and name not in resumed and node != trainer_node:
                    resumed[name], new_workers[name] = time.monotonic() - killed_at, pid
            return len(resumed) == len(running)

        wait_for("the worker groups to restart on surviving nodes", watch_resume, timeout_s=600, period_s=0.5)
        first_epoch_after = {}

        def watch_epochs():
            for name in running:
                if name not in first_epoch_after and max(self.logged_epochs(name), default=0) > max(at_kill[name][1], default=0):
                    first_epoch_after[name] = time.monotonic() - killed_at
            # A run killed after logging its last epoch (while writing its artifacts) logs none again.
            return all(name in first_epoch_after or self.jobs.status(name) != "RUNNING" for name in running)

        wait_for("an epoch after the restart", watch_epochs, timeout_s=600, period_s=0.5)
        for name in self.runs.values():
            status = self.jobs.wait(name, timeout_s=900)
            if not self.check(f"training job {name} succeeded", status == "SUCCEEDED",
                              status if status == "SUCCEEDED" else f"{status}; see {self.logs / (name + '.log')}"):
                # The log goes with the working directory; its end says why (in CI, only this output stays).
                print(failure_excerpt(self.jobs.logs(name)), flush=True)
        for name in running:
            checkpoint, _, reported = at_kill[name]
            after = self.reported_epochs(name, new_workers[name])  # by the restarted worker group
            # Nothing trained after the restart: the run had finished its epochs; it restored its newest checkpoint.
            resumed_from = after[0] - 1 if after else self.checkpoint_epoch(name)
            # Epochs finished before the kill that the restarted group trained again.
            redone = max(max(reported, default=0) - resumed_from, 0) if resumed_from is not None else None
            self.figures[f"resume_s_{name}"] = round(resumed[name], 1)
            after_kill = first_epoch_after.get(name)
            self.figures[f"first_epoch_after_kill_s_{name}"] = None if after_kill is None else round(after_kill, 1)
            self.figures[f"epochs_redone_{name}"] = redone
            newest = newest_at_kill[name]
            self.check(f"{name} resumed from its last checkpoint (epoch {checkpoint if newest == checkpoint else f'{checkpoint} or {newest}'})",
                       resumed_from in (checkpoint, newest) and redone is not None and redone <= 1,
                       f"restarted from epoch {resumed_from}; new workers after {resumed[name]:.1f} s, next epoch "
                       f"logged after {'-' if after_kill is None else f'{after_kill:.1f}'} s; {redone} finished epochs redone "
                       "(checkpoint every epoch)")
        if running:
            self.figures["resume_s"] = max(self.figures[f"resume_s_{n}"] for n in running)
            self.figures["epochs_redone"] = max(self.figures[f"epochs_redone_{n}"] for n in running)

    def start_stream(self):
        """A client on the head (which stays up) keeping reward requests in flight, as a trainer does."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        s = self.sizes
        Client = ray.remote(num_cpus=0, max_concurrency=4)(RewardClient)
        client = Client.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            self.cluster.nodes["head"].node_id, soft=False)).remote(APP)
        # Renders of 256^2: a replica then holds requests long enough that a kill catches some.
        ray.get(client.start_stream.remote(STREAM_DEPLOYMENT, s.stream_in_flight, 256))
        wait_for("the request stream", lambda: ray.get(client.stream_stats.remote())["answered"] >= s.stream_in_flight,
                 timeout_s=120)
        return client

    def kill_replica_mid_stream(self, client) -> None:
        import ray
        from ray.util.state import list_actors

        def replicas():
            return list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:{STREAM_DEPLOYMENT}"),
                                        ("state", "=", "ALIVE")])

        victim = replicas()[0]
        self.say(f"killing reward replica {victim.name} mid-stream")
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        answered_at_kill = ray.get(client.stream_stats.remote())["answered"]
        return replicas, victim, killed_at, answered_at_kill

    def finish_stream(self, client, replicas, victim, killed_at: float, answered_at_kill: int) -> None:
        """Once Serve has replaced the killed replica and the stream has gone on: was any request lost?"""
        import ray

        s = self.sizes
        wait_for("Serve to replace the replica", lambda: len([a for a in replicas() if a.actor_id != victim.actor_id]) >= 2,
                 timeout_s=300)
        self.figures["replica_replaced_s"] = round(time.monotonic() - killed_at, 1)
        wait_for("requests answered after the kill",
                 lambda: ray.get(client.stream_stats.remote())["answered"] >= answered_at_kill + s.stream_after_kill,
                 timeout_s=300)
        stats = ray.get(client.stop_stream.remote())
        ray.kill(client)
        self.figures.update({"stream_requests": stats["sent"], "requests_retried": stats["retried"],
                             "requests_lost": len(stats["errors"]), "most_attempts": stats["most_attempts"]})
        self.check("reward replica killed mid-stream, no request lost",
                   not stats["errors"] and stats["answered"] == stats["sent"],
                   f"{stats['sent']} requests ({s.stream_in_flight} in flight), {stats['retried']} retried, "
                   f"at most {stats['most_attempts']} attempts; replica replaced after {self.figures['replica_replaced_s']} s"
                   + (f"; lost: {stats['errors'][:2]}" if stats["errors"] else ""))

    # -- 6. the end state
    def final_checks(self) -> None:
        import httpx
        import mlflow
        import torch

        from r2d3ray.rewards.combiner import RewardCombiner
        from r2d3ray.serve.client import ServedRewards
        from r2d3ray.serve.http import encode_npy

        images = torch.rand(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        plane = ServedRewards(APP, RewardCombiner({STREAM_DEPLOYMENT: 1.0}), timeout_s=60)
        answer = plane.submit({"images": images}, ["a red cube"]).result()
        self.check("app answers by handle", answer.rewards.shape == (1,) and answer.grads is not None,
                   f"reward {answer.rewards.tolist()}")
        body = {"prompts": ["a red cube"], "images_npy": encode_npy(images.numpy()), "with_grad": True}
        answer = httpx.post(f"http://127.0.0.1:{self.http_port}/rewards/{STREAM_DEPLOYMENT}", json=body, timeout=60)
        self.check("app answers over HTTP", answer.status_code == 200 and "grad_npy" in answer.json(),
                   f"POST /rewards/{STREAM_DEPLOYMENT} -> {answer.status_code}")

        client = mlflow.MlflowClient(self.mlflow.uri)
        for name in self.runs.values():
            runs = self.mlflow_runs(name)
            if not self.check(f"MLflow server holds one run {name}", len(runs) == 1, f"{len(runs)} runs"):
                print(failure_excerpt(Path(self.mlflow.log.name).read_text(), lines=30), flush=True)
                continue
            run = runs[0]
            steps = sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch"))
            self.check(f"{name}: every epoch's metrics logged once", steps == list(range(1, self.sizes.epochs + 1)),
                       f"epoch steps {steps}; {len(run.data.metrics)} metrics")
            images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
            top = {f.path for f in client.list_artifacts(run.info.run_id)}
            lora = [f.path for f in client.list_artifacts(run.info.run_id, "lora")]
            self.check(f"{name}: pictures and artifacts on the server",
                       len(images) >= self.sizes.epochs + 1 and {"eval", "lora", "config.yaml"} <= top
                       and any(p.endswith(".safetensors") for p in lora),
                       f"{len(images)} images, artifacts {sorted(top)}")

    # -- helpers
    def checkpoint_epoch(self, name: str) -> int:
        """The epoch of the run's newest complete checkpoint in the shared storage (0: none)."""
        epochs = []
        for state in (self.shared / "storage" / name).glob("checkpoint_*/state.json"):
            try:
                epochs.append(json.loads(state.read_text())["epoch"])
            except (ValueError, KeyError, OSError):  # being written
                pass
        return max(epochs, default=0)

    def mlflow_runs(self, name: str) -> list:
        import mlflow

        client = mlflow.MlflowClient(self.mlflow.uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")

    def logged_epochs(self, name: str) -> list[int]:
        import mlflow

        runs = self.mlflow_runs(name)
        if not runs:
            return []
        history = mlflow.MlflowClient(self.mlflow.uri).get_metric_history(runs[0].info.run_id, "epoch")
        return sorted(int(m.step) for m in history)

    def reported_epochs(self, name: str, worker_pid: int) -> list[int]:
        """The epochs one Ray Train worker process of the run reported in its job's log ("[r2d3ray]
        epoch k/E", prefixed by Ray with the worker's pid), in order."""
        lines = [line for line in self.jobs.logs(name).splitlines()
                 if f"RayTrainWorker pid={worker_pid})" in line and "[r2d3ray] epoch " in line]
        return [int(line.split("[r2d3ray] epoch ")[1].split("/")[0]) for line in lines]

    def train_workers(self) -> dict[str, tuple[str, int]]:
        """{run name: (node id, pid) of its live Ray Train worker}."""
        from ray.util.state import list_actors

        by_job = {self.jobs.job_id(name): name for name in self.runs.values()}
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return {by_job[w.job_id]: (w.node_id, w.pid) for w in workers if w.job_id in by_job}

    def any_job_ended(self) -> bool:
        ended = [name for name in self.runs.values() if self.jobs.status(name) in ("SUCCEEDED", "FAILED", "STOPPED")]
        if ended:
            raise RuntimeError(f"training job(s) {ended} ended before both runs had a checkpoint; "
                               f"see {self.logs}")
        return False

    def teardown(self) -> None:
        """Every step runs whatever failed before it: nothing of the rehearsal is left running."""
        import ray

        steps = [ray.shutdown]
        steps += [lambda name=name: self.jobs.save_logs(name) for name in getattr(self, "runs", {}).values()]
        steps += [self.cluster.stop, self.mlflow.stop]
        for step in steps:
            try:
                step()
            except BaseException as err:  # noqa: BLE001 - an interrupted step must not skip the next ones
                print(f"teardown: {getattr(step, '__name__', step)}: {type(err).__name__}: {err}", flush=True)
        left = self.cluster.processes()
        if left:
            kill_tree(left)
        shutil.rmtree(self.cluster.temp_dir, ignore_errors=True)  # sockets and session files; the logs are in --workdir
        self.check("cluster and MLflow server torn down", not self.cluster.processes()
                   and self.mlflow.process.poll() is not None, f"{len(left)} processes left after the first pass")

    def report(self) -> None:
        print("\ncluster rehearsal (" + ("quick" if self.args.quick else "full") + f"), {time.monotonic() - self.started:.0f} s")
        width = max(len(name) for name, _, _ in self.checks)
        for name, ok, detail in self.checks:
            print(f"  {'ok    ' if ok else 'FAILED'} {name.ljust(width)}  {detail}")
        print("figures:")
        for key, value in self.figures.items():
            print(f"  {key:<36} {value}")
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({
                "quick": self.args.quick, "sizes": asdict(self.sizes), "wall_s": round(time.monotonic() - self.started, 1),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
                "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
                "figures": self.figures,
            }, indent=2))
            print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short form (make test): fewer epochs and requests")
    parser.add_argument("--out", help="write the checks and figures as JSON here")
    parser.add_argument("--workdir", help="shared directory, logs and MLflow store (default: a new temporary one)")
    return Rehearsal(parser.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
