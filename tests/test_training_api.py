"""POST/GET/DELETE /train: fast refusals, a run through `accelerate launch` that registers itself, cancel + queue."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from models.settings import Settings
from tests.conftest import wait_ready
from tests.training_helpers import FAST_TARGETS, shapes_dataset

CPU_LAUNCH = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


@pytest.fixture
def training_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={
        "datasets_dir": tmp_path / "datasets",
        "training_accelerate_config": None,
        "training_launch_args": CPU_LAUNCH,
        "training_stop_timeout_s": 30.0,
        "preload_default_model": False,
    })


@pytest.fixture
def training_client(training_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on a shared CPU: one thread each is fastest
    shapes_dataset(training_settings.datasets_dir / "shapes")
    with TestClient(create_app(training_settings)) as client:
        wait_ready(client)
        yield client


def lora_args(**overrides: object) -> dict[str, object]:
    args: dict[str, object] = {"dataset": "shapes", "base": "demo", "resolution": 64, "train_batch_size": 4,
                               "max_train_steps": 4, "learning_rate": 1e-2, "unet_target_modules": FAST_TARGETS,
                               "seed": 1, "logging_steps": 1}
    args.update(overrides)
    return args


def wait_for(client: TestClient, run_id: str, condition, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/train/{run_id}").json()
        if condition(run):
            return run
        time.sleep(0.2)
    log = client.get(f"/train/{run_id}/log").text
    raise TimeoutError(f"run {run_id} stuck in {run['state']}: {run}\n{log[-3000:]}")


def group_pids(leader: int) -> set[int]:
    return {process.pid for process in psutil.process_iter() if _pgid(process.pid) == leader}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"kind": "lora", "args": lora_args(rank=0)}, 422, "args.rank: Input should be greater than or equal to 1"),
        ({"kind": "lora", "args": lora_args(epochs=3)}, 422, "args.epochs: Extra inputs are not permitted"),
        ({"kind": "textual_inversion", "args": {}}, 422, "kind"),
        ({"kind": "lora", "args": lora_args(dataset="missing")}, 422, "dataset missing does not exist"),
        ({"kind": "lora", "args": lora_args(dataset="../outside")}, 422, "is outside the folders training may use"),
        ({"kind": "lora", "args": lora_args(dataset="/etc")}, 422, "dataset /etc is outside the folders"),
        ({"kind": "lora", "args": lora_args(base="nope")}, 404, "unknown model 'nope'"),
        ({"kind": "lora", "args": lora_args(base="/etc")}, 422, "base /etc is outside the folders"),
        ({"kind": "lora", "args": lora_args(output_dir="/tmp/x")}, 422, "output_dir: chosen by the server"),
        ({"kind": "lora", "args": lora_args(register="demo")}, 422, "'demo' is the base's own name"),
        ({"kind": "dreambooth", "args": {"instance_data_dir": "shapes", "instance_prompt": "sks",
                                         "with_prior_preservation": True}}, 422, "needs class_prompt"),
        ({"kind": "dreambooth", "args": {"instance_data_dir": "shapes", "instance_prompt": "sks",
                                         "class_data_dir": "/var/tmp"}}, 422, "class_data_dir /var/tmp is outside"),
    ],
)
def test_bad_requests_fail_at_once_and_start_nothing(training_client, training_settings, body, status, message):
    response = training_client.post("/train", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert training_client.get("/train").json() == {"runs": []}
    assert not (training_settings.output_dir / "training").exists()


def test_registering_a_taken_name_is_refused(training_client):
    response = training_client.post("/train", json={"kind": "lora", "args": lora_args(register="sd15-random")})
    assert response.status_code == 422
    assert "'sd15-random' is already registered" in response.json()["detail"]


def test_unknown_run_is_404(training_client):
    assert training_client.get("/train/nope").status_code == 404
    assert training_client.delete("/train/nope").json()["detail"] == "no training run 'nope'"


@pytest.mark.slow
def test_runs_queue_train_register_and_cancel_through_accelerate_launch(training_client):
    """One run per device: the second waits, starts when the first is done, and a cancel stops all its processes."""
    response = training_client.post("/train", json={"kind": "lora", "args": lora_args(register="api-shapes")})
    assert response.status_code == 202, response.text
    first = response.json()
    assert response.headers["location"] == f"/train/{first['id']}"
    long_run = lora_args(max_train_steps=100_000, checkpointing_steps=100_000)
    second = training_client.post("/train", json={"kind": "lora", "args": long_run}).json()
    assert second["state"] == "queued" and second["queue_position"] == 1

    # The first run trains to the end and registers itself; the server lists it without a restart.
    done = wait_for(training_client, first["id"], lambda run: run["state"] not in ("queued", "running"))
    assert done["state"] == "succeeded", training_client.get(f"/train/{first['id']}/log").text[-3000:]
    assert done["progress"]["step"] == 4 and done["progress"]["max_steps"] == 4 and done["exit_code"] == 0
    assert done["registered_as"] == "api-shapes" and Path(done["output"]).is_file()
    log = training_client.get(f"/train/{first['id']}/log").text
    assert '"event": "step", "step": 4' in log  # the script's JSON progress lines, from its stdout
    models = {model["name"]: model for model in training_client.get("/models").json()["models"]}
    assert models["api-shapes"]["kind"] == "lora" and models["api-shapes"]["base"] == "demo"
    assert models["api-shapes"]["created_by"] == first["id"]
    again = training_client.post("/train", json={"kind": "lora", "args": lora_args(register="api-shapes")})
    assert again.status_code == 422 and "already registered" in again.json()["detail"]

    # Then the queued run starts; cancelling it ends the launcher and the training process.
    running = wait_for(training_client, second["id"], lambda run: run["progress"] is not None)
    assert running["state"] == "running"
    pids = group_pids(training_client.app.state.training.get(second["id"]).pid)
    assert len(pids) >= 2  # accelerate's launcher and the training process
    cancelled = training_client.delete(f"/train/{second['id']}").json()
    assert cancelled["state"] == "cancelled"
    assert not [pid for pid in pids if alive(pid)]
    # SIGTERM let the script save a checkpoint it can resume from.
    folder = Path(cancelled["options"]["output_dir"])
    assert list(folder.glob("checkpoint-*")), sorted(path.name for path in folder.iterdir())
    assert [run["state"] for run in training_client.get("/train").json()["runs"]] == ["succeeded", "cancelled"]
