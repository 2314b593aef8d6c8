"""Training runs and crashes (issue 10, point 3), with real processes and signals: a run whose server dies stops
by itself and registers nothing; a later server stops what survived and records what really happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from models.types import JobStatus
from tests.conftest import ServerProcess, server_env
from tests.training_helpers import FAST_TARGETS, shapes_dataset
from tests.utils import wait_for
from training.lifeline import ServerLifeline, process_started
from training.runs import TrainingRunManager

CPU_LAUNCH = '["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", ' \
             '"--dynamo_backend", "no"]'


def sleeper() -> subprocess.Popen[bytes]:
    """A process group of its own that would run for ten minutes: a stand-in for a training launcher."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_lifeline_notices_a_server_killed_with_sigkill():
    server = sleeper()
    lifeline = ServerLifeline(server.pid, process_started(server.pid) or 0.0)
    assert lifeline.alive(now=True)
    server.send_signal(signal.SIGKILL)
    server.wait()
    assert not lifeline.alive(now=True)
    # A new process that got the same pid is not the server: the start time differs.
    assert not ServerLifeline(os.getpid(), 1.0).alive(now=True)


def orphan_record(root: Path, run_id: str, pid: int, events: list[dict]) -> Path:
    folder = root / "training" / run_id
    folder.mkdir(parents=True)
    record = {"id": run_id, "kind": "lora", "options": {"register_as": "orphan"}, "state": "running",
              "created_at": time.time(), "started_at": time.time(), "pid": pid, "pid_started": process_started(pid)}
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "progress.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    return folder


def test_a_restart_stops_a_run_that_outlived_its_server_and_records_it_truthfully(settings):
    survivor = sleeper()
    quiet = settings.model_copy(update={"training_stop_timeout_s": 5.0})
    orphan_record(quiet.output_dir, "lora-survivor", survivor.pid,
                  [{"event": "step", "step": 7}, {"event": "stopped", "step": 7, "checkpoint": "/x/checkpoint-7"}])
    orphan_record(quiet.output_dir, "lora-finished", 2**22 + 12345,  # long gone
                  [{"event": "done", "step": 4, "output": "/x/w.safetensors", "registered": "made-it"}])
    manager = TrainingRunManager(quiet)
    try:
        manager.start()
        assert survivor.wait(timeout=10) == -signal.SIGTERM  # stopped at start-up, not left running
        stopped = manager.get("lora-survivor")
        assert stopped.state is JobStatus.interrupted and "stopped at step 7" in (stopped.error or "")
        # A run that did finish and register before its server died is recorded as what it was.
        assert manager.get("lora-finished").state is JobStatus.succeeded
        saved = json.loads((quiet.output_dir / "training" / "lora-survivor" / "run.json").read_text())
        assert saved["state"] == "interrupted"
    finally:
        manager.stop()
        if survivor.poll() is None:
            survivor.kill()


def test_a_restart_leaves_an_unrelated_process_with_a_reused_pid_alone(settings):
    bystander = sleeper()
    folder = orphan_record(settings.output_dir, "lora-reused", bystander.pid, [])
    record = json.loads((folder / "run.json").read_text())
    record["pid_started"] = 1.0  # the run's launcher started long ago; this pid is someone else now
    (folder / "run.json").write_text(json.dumps(record))
    manager = TrainingRunManager(settings)
    try:
        manager.start()
        assert bystander.poll() is None
        assert manager.get("lora-reused").state is JobStatus.interrupted
    finally:
        manager.stop()
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_kill_9_of_the_server_stops_its_training_run_which_registers_nothing(tmp_path, model_cache):
    """Before: the run (its own session) trained on, registered its LoRA, and after a restart was listed as
    interrupted yet registered."""
    shapes_dataset(tmp_path / "datasets" / "shapes")
    env = server_env(tmp_path, model_cache, SDSERVE_DATASETS_DIR=str(tmp_path / "datasets"),
                     SDSERVE_TRAINING_LAUNCH_ARGS=CPU_LAUNCH, SDSERVE_TRAINING_ACCELERATE_CONFIG="none.yaml",
                     SDSERVE_PRELOAD_DEFAULT_MODEL="false", OMP_NUM_THREADS="1")
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        server.wait_healthy()
        args = {"dataset": "shapes", "base": "demo", "resolution": 64, "train_batch_size": 2,
                "max_train_steps": 100_000, "checkpointing_steps": 100_000, "learning_rate": 1e-2,
                "unet_target_modules": FAST_TARGETS, "seed": 1, "logging_steps": 1, "register": "orphan"}
        run = httpx.post(f"{server.url}/train", json={"kind": "lora", "args": args}, timeout=60).json()
        assert run["state"] == "running", run
        wait_for(lambda: (httpx.get(f"{server.url}/train/{run['id']}", timeout=10).json()["progress"] or {})
                 .get("step", 0) >= 2, timeout_s=240, interval_s=0.5)
        folder = Path(run["options"]["output_dir"])
        launcher = json.loads((folder / "run.json").read_text())["pid"]
        members = [process.pid for process in psutil.process_iter() if _pgid(process.pid) == launcher]
        assert len(members) >= 2  # accelerate's launcher and the training process

        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        # The run notices within a second or so, checkpoints, and exits without registering.
        wait_for(lambda: all(gone(pid) for pid in members), timeout_s=120, interval_s=0.5)
        assert "orphan" not in (tmp_path / "registry.yaml").read_text()
        assert list(folder.glob("checkpoint-*"))
    finally:
        server.stop()

    restarted = ServerProcess(env, tmp_path / "server-2.log")
    try:
        restarted.wait_healthy()
        after = httpx.get(f"{restarted.url}/train/{run['id']}", timeout=10).json()
        assert after["state"] == "interrupted" and after["registered_as"] is None, after
        assert "stopped at step" in after["error"]
        assert httpx.get(f"{restarted.url}/models/orphan", timeout=10).status_code == 404
    finally:
        restarted.stop()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None

