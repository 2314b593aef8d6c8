"""The API on Ray Serve: a local Ray instance (2 CPUs, no dashboard), the ingress and two engine replicas of the demo
model, reached over HTTP through Serve's proxy like any client would.

Each replica takes one job at a time here (max_ongoing_requests=1), so concurrent jobs land on both replicas
deterministically; which replica took a job is read from the shared database (the `engine` column).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ROOT
from tests.utils import free_port, parse_sse, wait_for

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow
SLOW_JOB = {"task": "text2img", "width": 128, "height": 128, "steps": 150}


class Cluster:
    def __init__(self, url: str, folder: Path):
        self.url = url
        self.folder = folder
        self.http = httpx.Client(base_url=url, timeout=120)
        self.pids: dict[str, int] = {}

    @property
    def database(self) -> Path:
        return self.folder / "data" / "sdserve.db"

    def rows(self, query: str, *parameters: object) -> list[tuple]:
        with sqlite3.connect(self.database) as connection:
            return connection.execute(query, parameters).fetchall()

    def engine_of(self, job_id: str) -> str:
        return wait_for(lambda: (self.rows("SELECT engine FROM jobs WHERE id = ?", job_id) or [(None,)])[0][0])

    def replica_pids(self) -> dict[str, int]:
        """name -> pid of each engine replica, asked until both have answered."""
        handle = serve.get_deployment_handle("EngineReplica", app_name="sdserve")
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            identity = handle.identity.remote().result(timeout_s=30)
            seen[identity["name"]] = identity["pid"]
        return seen


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    environment = {
        "SDSERVE_REGISTRY_PATH": str(folder / "registry.yaml"),
        "SDSERVE_CACHE_DIR": str(model_cache),
        "SDSERVE_OUTPUT_DIR": str(folder / "outputs"),
        "SDSERVE_DATA_DIR": str(folder / "data"),
        "SDSERVE_DEVICE": "cpu",
        "SDSERVE_DEFAULT_MODEL": "demo",  # the tests route, cancel and kill on the tiny demo
        "SDSERVE_PREVIEW_EVERY": "0",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # the Ray processes started below inherit them
    port = free_port()
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                 configure_logging=False)
        from models.cluster.deployments import EngineReplicaDeployment, Ingress

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        replicas = EngineReplicaDeployment.options(
            num_replicas=2, max_ongoing_requests=1, ray_actor_options={"num_cpus": 0.5}
        )
        app = Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(replicas.bind())
        serve.run(app, name="sdserve", route_prefix="/", blocking=False)
        cluster = Cluster(f"http://127.0.0.1:{port}", folder)
        wait_for(lambda: _healthy(cluster.http), timeout_s=120, interval_s=0.5)
        cluster.pids = cluster.replica_pids()
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def _generate(cluster: Cluster, results: list, prompt: str, **fields: object) -> None:
    body = {"prompt": prompt, "width": 64, "height": 64, "steps": 4, **fields}
    results.append(cluster.http.post("/text2img", json=body))


def _follow(cluster: Cluster, job_id: str, into: list[tuple[str, dict]]) -> threading.Thread:
    def read() -> None:
        with cluster.http.stream("GET", f"/jobs/{job_id}/events") as response:
            into.extend(parse_sse(response.read().decode()))

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def test_both_replicas_serve_requests_and_everything_lands_in_the_shared_database(cluster: Cluster):
    assert len(cluster.pids) == 2
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=_generate, args=(cluster, results, f"fox {n}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [response.status_code for response in results] == [200] * 4
    job_ids = [response.json()["job_id"] for response in results]
    assert len({cluster.engine_of(job_id) for job_id in job_ids}) == 2  # both replicas took jobs

    # Every job and image is in the one database; each PNG is in the one output folder.
    placeholders = ",".join("?" * len(job_ids))
    wait_for(lambda: len(cluster.rows(f"SELECT id FROM images WHERE job_id IN ({placeholders})", *job_ids)) == 4)
    statuses = cluster.rows(f"SELECT status FROM jobs WHERE id IN ({placeholders})", *job_ids)
    assert [status for (status,) in statuses] == ["succeeded"] * 4
    for (path,) in cluster.rows(f"SELECT path FROM images WHERE job_id IN ({placeholders})", *job_ids):
        assert (cluster.folder / "outputs" / path).stat().st_size > 0
    listed = cluster.http.get("/images", params={"prompt": "fox", "limit": 50}).json()
    assert listed["total"] == 4
    image = cluster.http.get(f"/images/{listed['images'][0]['id']}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_requests_for_a_model_go_to_the_replica_that_has_it_loaded(cluster: Cluster):
    created = cluster.http.post("/models", json={"name": "demo-b", "kind": "base", "source": "demo:tiny"})
    assert created.status_code in (200, 201), created.text
    assert created.json()["family"] == "sd"  # the ingress answers registry calls as one process does
    outside = cluster.http.post("/models", json={"name": "stray", "kind": "base", "source": "/etc/stray"})
    assert outside.status_code == 403, outside.text
    assert cluster.http.delete("/models/demo").status_code == 409  # the default model stays
    # A replica's refusal crosses the ingress with its status and message (here the model family's check).
    refused = cluster.http.post("/text2img", json={"prompt": "x", "prompt_2": "y", "width": 64, "height": 64})
    assert refused.status_code == 422 and "prompt_2" in refused.json()["detail"], refused.text
    results: list[httpx.Response] = []
    for n in range(4):
        _generate(cluster, results, f"routed {n}", model="demo-b")
    assert [response.status_code for response in results] == [200] * 4
    engines = {cluster.engine_of(response.json()["job_id"]) for response in results}
    assert len(engines) == 1, engines  # loaded once, then every request went where it is loaded


def test_progress_events_and_cancel_go_through_the_ingress(cluster: Cluster):
    created = cluster.http.post("/jobs", json={**SLOW_JOB, "prompt": "to cancel"})
    assert created.status_code == 202
    job_id = created.json()["id"]
    events: list[tuple[str, dict]] = []
    reader = _follow(cluster, job_id, events)
    wait_for(lambda: cluster.http.get(f"/jobs/{job_id}").json()["step"] >= 2, timeout_s=60)

    cancelled = cluster.http.delete(f"/jobs/{job_id}")
    assert cancelled.status_code in (200, 202)
    reader.join(timeout=60)
    kinds = [kind for kind, _ in events]
    assert "started" in kinds and "progress" in kinds
    assert kinds[-1] == "cancelled", kinds
    progress = [data for kind, data in events if kind == "progress"]
    assert progress[0]["total_steps"] == 150 and progress[-1]["step"] < 150
    assert cluster.http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    assert cluster.rows("SELECT status FROM jobs WHERE id = ?", job_id) == [("cancelled",)]
    assert cluster.http.delete(f"/jobs/{job_id}").status_code == 409


def test_a_killed_replica_fails_only_its_job_and_the_next_requests_succeed(cluster: Cluster):
    first = cluster.http.post("/jobs", json={**SLOW_JOB, "prompt": "doomed"}).json()["id"]
    second = cluster.http.post("/jobs", json={**SLOW_JOB, "prompt": "survivor", "steps": 40}).json()["id"]
    doomed_engine = cluster.engine_of(first)
    assert cluster.engine_of(second) != doomed_engine  # one job per replica at a time
    events: list[tuple[str, dict]] = []
    reader = _follow(cluster, first, events)
    wait_for(lambda: cluster.http.get(f"/jobs/{first}").json()["step"] >= 1, timeout_s=60)

    os.kill(cluster.pids[doomed_engine], signal.SIGKILL)
    reader.join(timeout=60)
    assert events[-1][0] == "error"
    assert "engine replica running this job stopped" in events[-1][1]["detail"]
    failed = cluster.http.get(f"/jobs/{first}").json()
    assert failed["status"] == "failed" and "not retried" in failed["error"]
    assert cluster.rows("SELECT status FROM jobs WHERE id = ?", first) == [("failed",)]

    # The other replica's job is untouched, and new requests are served while Ray restarts the dead one.
    def survivor_finished() -> dict | None:
        job = cluster.http.get(f"/jobs/{second}").json()
        return job if job["status"] not in ("queued", "running") else None

    survivor = wait_for(survivor_finished)
    assert survivor["status"] == "succeeded"
    results: list[httpx.Response] = []
    for n in range(2):
        _generate(cluster, results, f"after the crash {n}")
    assert [response.status_code for response in results] == [200, 200]
    # The replacement takes the dead replica's name (its rank), so it recovers only that replica's jobs.
    def same_names() -> dict[str, int] | None:
        try:
            pids = cluster.replica_pids()
        except (TimeoutError, ray.exceptions.RayError):  # the replacement is still starting
            return None
        return pids if set(pids) == set(cluster.pids) else None

    replaced = wait_for(same_names, timeout_s=120, interval_s=1)
    assert replaced[doomed_engine] != cluster.pids[doomed_engine]
    cluster.pids = replaced


def test_the_ingress_restarting_loses_no_finished_job(cluster: Cluster):
    finished = cluster.http.post("/text2img", json={"prompt": "kept", "width": 64, "height": 64, "steps": 3,
                                                    "seed": 11})
    assert finished.status_code == 200
    job_id, image = finished.json()["job_id"], finished.json()["images"][0]
    ingress = [process for process in psutil.process_iter(["cmdline"])
               if "ServeReplica:sdserve:Ingress" in " ".join(process.info["cmdline"] or ())]
    assert len(ingress) == 1
    ingress[0].send_signal(signal.SIGKILL)
    wait_for(lambda: ingress[0].pid not in _ingress_pids(), timeout_s=30)
    recorded = wait_for(lambda: _job_if_up(cluster, job_id), timeout_s=120, interval_s=0.5)
    assert recorded["status"] == "succeeded"
    assert recorded["result"]["images"] == [image]  # the same PNG, read back from the shared output folder


def _ingress_pids() -> set[int]:
    return {process.pid for process in psutil.process_iter(["cmdline"])
            if "ServeReplica:sdserve:Ingress" in " ".join(process.info["cmdline"] or ())}


def _job_if_up(cluster: Cluster, job_id: str) -> dict | None:
    try:
        response = cluster.http.get(f"/jobs/{job_id}")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None
