"""The cluster engine without Ray running: what the single-process server must never load, the routing ids, and
the job store's per-replica bookkeeping that lets replicas share one database."""

from __future__ import annotations

import subprocess
import sys

import pytest

from models.cluster.routing import base_model, model_id, request_model_id
from models.jobs.store import Store
from models.types import GenerationRequest, LoraSpec
from tests.conftest import ROOT


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: 10-30 s; test_architecture checks it statically
def test_the_single_process_server_never_imports_ray():
    """./run_api.sh serves api.app:create_app: building the app (and its engine factory) loads no Ray."""
    check = (
        "import sys, api.app, models.engines; api.app.create_app(); "
        "loaded = sorted(name for name in sys.modules if name == 'ray' or name.startswith(('ray.', 'models.cluster')));"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_request_is_routed_by_its_model_and_lora_set():
    plain = GenerationRequest(task="text2img", prompt="x")
    assert request_model_id(plain, "demo") == "demo"
    styled = GenerationRequest(task="text2img", prompt="x", model="sd15",
                               loras=(LoraSpec("style-b"), LoraSpec("style-a", scale=0.5)))
    assert request_model_id(styled, "demo") == "sd15+style-a,style-b"  # the order and scales do not matter
    assert model_id("sd15", ("style-b", "style-a")) == request_model_id(styled, "demo")
    assert base_model("sd15+style-a,style-b") == "sd15" and base_model("demo") == "demo"


def _job(job_id: str, engine: str | None, status: str = "running") -> dict:
    from models.jobs.store import utcnow

    return {"id": job_id, "task": "text2img", "status": status, "prompt": "p", "model": "demo", "parameters": {},
            "steps": 4, "engine": engine, "created_at": utcnow()}


def test_a_replica_marks_only_its_own_unfinished_jobs_interrupted(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    for job_id, engine in (("a", "sdserve/EngineReplica#0"), ("b", "sdserve/EngineReplica#1"), ("c", None)):
        store.save_job(_job(job_id, engine))
    assert store.mark_interrupted("restarted", engine="sdserve/EngineReplica#0") == 1
    statuses = {job_id: store.get_job(job_id).status for job_id in "abc"}
    assert statuses == {"a": "interrupted", "b": "running", "c": "running"}
    assert store.mark_interrupted("one process restarted") == 2  # without a name: every unfinished job


def test_a_lost_job_is_failed_once_and_a_finished_one_is_left_alone(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.save_job(_job("lost", "r0"))
    store.save_job(_job("done", "r0", status="succeeded"))
    assert store.fail_unfinished("lost", "its replica died") is True
    assert store.fail_unfinished("done", "its replica died") is False
    lost, done = store.get_job("lost"), store.get_job("done")
    assert (lost.status, lost.error) == ("failed", "its replica died")
    assert (done.status, done.error) == ("succeeded", None)
