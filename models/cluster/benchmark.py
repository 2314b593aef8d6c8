"""Throughput of the API on Ray Serve with 1, 2, ... engine replicas: the same requests over HTTP through Serve's
proxy, several at once, on a local Ray instance; prints one line per replica count.

    python -m models.cluster.benchmark --replicas 1 2 --requests 16 --concurrency 4 --size 256 --steps 20
    python -m models.cluster.benchmark --replicas 1 2 4 --gpus-per-replica 1 --model sd15 --size 512 --steps 30
    python -m models.bench --rows replicas                 # the same, as a row of the project's benchmark command

Each replica gets `--cpus-per-replica` CPUs (and `--gpus-per-replica` GPUs); the Ray instance gets as many CPUs as
the replicas need (at least 1). Set OMP_NUM_THREADS=1 on CPUs so each replica uses its own core.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray import serve

from models.cluster.deployments import EngineReplicaDeployment, Ingress

URL = "http://127.0.0.1:{port}"  # Serve's proxy, on a port free when the run starts


def _request(arguments: argparse.Namespace, seed: int) -> float:
    body = {"prompt": "a lighthouse at dusk", "width": arguments.size, "height": arguments.size,
            "steps": arguments.steps, "seed": seed, "model": arguments.model, "save": False}
    request = urllib.request.Request(f"{arguments.url}/text2img", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - started


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def measure(replicas: int, arguments: argparse.Namespace) -> dict[str, object]:
    deployment = EngineReplicaDeployment.options(
        num_replicas=replicas, max_ongoing_requests=arguments.max_ongoing,
        ray_actor_options={"num_cpus": arguments.cpus_per_replica, "num_gpus": arguments.gpus_per_replica},
    )
    app = Ingress.options(ray_actor_options={"num_cpus": 0}).bind(deployment.bind())
    serve.run(app, name="sdserve", route_prefix="/", blocking=False)
    while not _healthy(arguments.url):
        time.sleep(0.5)
    with ThreadPoolExecutor(arguments.concurrency) as pool:  # warm-up: every replica loads the model
        list(pool.map(lambda seed: _request(arguments, seed), range(2 * replicas)))
        started = time.perf_counter()
        latencies = list(pool.map(lambda seed: _request(arguments, 1000 + seed), range(arguments.requests)))
        elapsed = time.perf_counter() - started
    serve.delete("sdserve")
    return {
        "replicas": replicas, "requests": arguments.requests, "concurrency": arguments.concurrency,
        "size": f"{arguments.size}x{arguments.size}", "steps": arguments.steps,
        "images/min": f"{60 * arguments.requests / elapsed:.1f}",
        "median s/request": f"{statistics.median(latencies):.2f}", "wall s": f"{elapsed:.1f}",
        "latencies": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--max-ongoing", type=int, default=2, help="jobs one replica takes at once")
    parser.add_argument("--json", type=Path, help="also write the rows (with every request's latency) here")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The Ray processes inherit these: this checkout's code, and a database of their own.
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("SDSERVE_DATA_DIR", tempfile.mkdtemp(prefix="sdserve-bench-"))
    cpus = max(1, math.ceil(max(arguments.replicas) * arguments.cpus_per_replica))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    arguments.url = URL.format(port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        rows = [measure(replicas, arguments) for replicas in arguments.replicas]
    finally:
        serve.shutdown()
        ray.shutdown()
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    columns = [column for column in rows[0] if column != "latencies"]
    sys.stdout.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for row in rows:
        sys.stdout.write("| " + " | ".join(str(row[column]) for column in columns) + " |\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
