"""Fixtures: isolated settings (temporary registry, outputs), an in-process client, a real server process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from models.settings import Settings
from tests.utils import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
BESIDE_KEY = pytest.StashKey["BesideRun"]()


class BesideRun:
    """A long subprocess that a `runs_beside` test starts at collection and checks at the end of the session.

    Its output goes to files in its folder (a pipe nobody reads until the end would fill and stall it)."""

    def __init__(self, start: Callable[[Path], list[str]], folder: Path):
        self.folder = folder
        self.stderr_path = folder / "stderr.txt"
        with open(folder / "stdout.txt", "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
            self.process = subprocess.Popen(start(folder), cwd=ROOT, env=env, stdout=stdout, stderr=stderr)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self.stop()

    def stderr_tail(self, characters: int = 4000) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-characters:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.hookimpl(trylast=True)  # after -m, -k and --deselect have chosen the tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The suite keeps one of CI's two cores busy: a `runs_beside(command=...)` test starts `command(folder)` now, on
    the other core, and runs last, so its minutes overlap the rest of the suite instead of adding to it."""
    if config.option.collectonly:
        return
    beside = [item for item in items if item.get_closest_marker("runs_beside")]
    for item in beside:
        items.remove(item)
        items.append(item)
        folder = Path(tempfile.mkdtemp(prefix=f"sdserve-{item.name[:40]}-"))
        item.stash[BESIDE_KEY] = BesideRun(item.get_closest_marker("runs_beside").kwargs["command"], folder)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for item in session.items:
        if BESIDE_KEY in item.stash:
            item.stash[BESIDE_KEY].stop()
            shutil.rmtree(item.stash[BESIDE_KEY].folder, ignore_errors=True)


@pytest.fixture
def beside_run(request: pytest.FixtureRequest) -> BesideRun:
    return request.node.stash[BESIDE_KEY]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin models are built once per session (the demo takes well under a second)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def settings(tmp_path: Path, model_cache: Path) -> Settings:
    return Settings(
        registry_path=tmp_path / "registry.yaml",
        cache_dir=model_cache,
        output_dir=tmp_path / "outputs",
        data_dir=tmp_path / "data",
        device="cpu",
        default_model="demo",  # the random demo: the fastest model, for tests that need any model at all
    )


def wait_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(client.get("/health").json())


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def server_env(tmp_path: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SDSERVE_REGISTRY_PATH=str(tmp_path / "registry.yaml"),
        SDSERVE_CACHE_DIR=str(model_cache),
        SDSERVE_OUTPUT_DIR=str(tmp_path / "outputs"),
        SDSERVE_DATA_DIR=str(tmp_path / "data"),
        SDSERVE_DEVICE="cpu",
        SDSERVE_DEFAULT_MODEL="demo",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


class ServerProcess:
    """uvicorn serving the real app in a subprocess, the way run_api.sh starts it."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_healthy(self) -> dict:
        try:
            return wait_until_healthy(self.url)
        except TimeoutError:
            raise TimeoutError(self.log_path.read_text(errors="replace")[-4000:]) from None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("server")
    process = ServerProcess(server_env(folder, model_cache), folder / "server.log")
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()
