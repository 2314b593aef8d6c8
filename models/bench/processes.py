"""The two kinds of process a comparison drives: the real server (uvicorn, over HTTP) and a bare diffusers process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class ServerProcess:
    """uvicorn serving the app in its own process, as run_api.sh starts it; requests go over HTTP."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning"]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env=_child_env(env), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(900.0, connect=10.0))

    def wait_healthy(self, timeout_s: float = 900.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.log_path}")
            try:
                if self.client.get("/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server was not healthy after {timeout_s}s; see {self.log_path}")

    def text2img(self, body: dict[str, Any], client: httpx.Client | None = None) -> tuple[float, dict[str, Any]]:
        """Seconds for one POST /text2img, from sending to the decoded answer, and the answer."""
        started = time.perf_counter()
        response = (client or self.client).post("/text2img", json=body)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"POST /text2img answered {response.status_code}: {response.text[:500]}")
        return seconds, response.json()

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class BareProcess:
    """`python -m models.bench.bare`: a diffusers pipeline in its own process, one JSON line per command."""

    def __init__(self, folder: Path, variant: str, log_path: Path, device: str = "cpu",
                 cache_dir: Path | None = None, env: dict[str, str] | None = None):
        command = [sys.executable, "-m", "models.bench.bare", "--folder", str(folder), "--variant", variant,
                   "--device", device]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env=_child_env(env or {}), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
                                        start_new_session=True)
        self.load_s: float | None = None

    def wait_ready(self) -> float:
        self.load_s = float(self._read()["load_s"])
        return self.load_s

    def generate(self, prompt: str, size: int, steps: int, seed: int, guidance: float = 7.0,
                 image: bool = False) -> dict[str, Any]:
        return self._ask({"op": "generate", "prompt": prompt, "size": size, "steps": steps, "seed": seed,
                          "guidance": guidance, "image": image})

    def rss_mb(self) -> float:
        return float(self._ask({"op": "rss"})["rss_mb"])

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        stdout: IO[str] = self.process.stdout  # type: ignore[assignment]
        while True:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"the bare process exited ({self.process.wait()}); see {self.log_path}")
            if line.startswith("{"):  # anything else is a library printing to stdout
                return json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self._ask_quit()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()

    def _ask_quit(self) -> None:
        stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        stdin.write(json.dumps({"op": "quit"}) + "\n")
        stdin.flush()
        stdin.close()
