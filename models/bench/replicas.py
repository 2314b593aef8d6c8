"""The `replicas` row: throughput of the API on Ray Serve with two engine replicas against one (README "Scaling
out"). It runs `python -m models.cluster.benchmark` in a process of its own, so this package never imports Ray, and
is skipped where the `ray` extra is not installed. Not in the default set: it starts a local Ray instance.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

from models.bench.processes import ROOT
from models.bench.rows import Context, Row
from models.bench.stats import Comparison, Side, Skipped

logger = logging.getLogger(__name__)


def replicas(context: Context) -> list[Row]:
    if importlib.util.find_spec("ray") is None:
        return [Skipped("replicas", "the ray extra is not installed (pip install '.[ray]', or the dev lock)")]
    config = context.config
    tiny = config.demo_steps <= 2
    requests, concurrency = (4, 2) if tiny else (12, 4)
    out = context.logs / "replicas.json"
    command = [sys.executable, "-m", "models.cluster.benchmark", "--replicas", "1", "2", "--requests", str(requests),
               "--concurrency", str(concurrency), "--size", str(config.demo_size), "--steps", str(config.demo_steps),
               "--json", str(out)]
    if config.device == "cuda":
        command += ["--gpus-per-replica", "1"]
    # The Ray processes inherit this environment: this checkout's code, the run's registry and models, one thread
    # per replica (each replica gets one CPU of the Ray instance).
    env = dict(os.environ) | context.server_env(OMP_NUM_THREADS="1", SDSERVE_DATA_DIR=str(config.work / "data-ray"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with open(context.logs / "replicas.log", "ab") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    one, two = json.loads(out.read_text(encoding="utf-8"))
    setup = f"{one['size']}, {one['steps']} steps, {requests} requests, {concurrency} at once"
    return [Comparison(
        "replicas", "demo", setup, "s/request", Side("2 replicas", two["latencies"]),
        Side("1 replica", one["latencies"]),
        notes=f"images/min: 2 replicas {two['images/min']}, 1 replica {one['images/min']} (Ray Serve, one "
              f"{config.device} device per replica)",
        extra={"images_per_min": {"2": two["images/min"], "1": one["images/min"]}},
    )]
