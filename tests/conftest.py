"""Fixtures: isolated settings (temporary registry, outputs), an in-process client, a real server process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from models.settings import Settings
from tests.utils import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent


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
