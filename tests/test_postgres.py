"""The jobs and images database on PostgreSQL, shared by engine replicas: a throwaway server started here (initdb and
pg_ctl on a free port, as an unprivileged user), two named engines writing to it, one of them restarting.

Skips, saying why, where PostgreSQL is not installed (scripts/install_postgres.sh installs Debian's) or the driver
(the `postgres` extra) is missing.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.jobs.store import Store
from models.local import LocalEngine
from models.settings import Settings
from models.types import EngineState, GenerationRequest, JobOptions
from tests.utils import free_port

pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed (pip install '.[postgres]')")
pytestmark = pytest.mark.slow


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).parent if found else None


def _run_as() -> str | None:
    """initdb refuses to run as root: run the server as Debian's `postgres` user then; else as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run a PostgreSQL server as")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (scripts/install_postgres.sh installs Debian's postgresql)")
    user = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="sdserve-pg-"))
    if user is not None:
        shutil.chown(folder, user)
    data, port = folder / "data", free_port()
    run = {"user": user, "check": True, "capture_output": True, "timeout": 120}
    subprocess.run([binaries / "initdb", "-D", data, "-U", "sdserve", "--auth=trust", "-E", "UTF8"], **run)
    subprocess.run([binaries / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "start", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"], **run)
    try:
        yield f"postgresql+psycopg://sdserve@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([binaries / "pg_ctl", "-D", data, "-m", "immediate", "stop"], **{**run, "check": False})
        shutil.rmtree(folder, ignore_errors=True)


def _settings(tmp_path: Path, model_cache: Path, url: str) -> Settings:
    return Settings(registry_path=tmp_path / "registry.yaml", cache_dir=model_cache, output_dir=tmp_path / "outputs",
                    data_dir=tmp_path / "data", device="cpu", database_url=url, preview_every=0)


async def _started(engine: LocalEngine) -> LocalEngine:
    await engine.start()
    for _ in range(1200):
        if (await engine.health()).state is EngineState.ready:
            return engine
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the engine did not get ready: {await engine.health()}")


async def _generate(engine: LocalEngine, prompt: str) -> str:
    request = GenerationRequest(task="text2img", prompt=prompt, width=64, height=64, steps=3, seed=5)
    job = await engine.submit(request, JobOptions(save=True))
    await engine.wait(job.id)
    engine.recorder.flush()
    return job.id


def test_replicas_share_one_postgres_database(tmp_path: Path, model_cache: Path, postgres_url: str):
    # Replicas starting together migrate one fresh database at once: they take turns (an advisory lock).
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(postgres_url).close()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    openers = [threading.Thread(target=open_store) for _ in range(3)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join()
    assert errors == []

    settings = _settings(tmp_path, model_cache, postgres_url)

    async def scenario() -> None:
        # One after the other: two engines loading a model at once in one process race in accelerate's
        # meta-device loading (replicas are separate processes; this test is not).
        first = await _started(LocalEngine(settings, name="app/EngineReplica#0"))
        second = await _started(LocalEngine(settings, name="app/EngineReplica#1"))
        try:
            ids = [await _generate(first, "a lighthouse"), await _generate(second, "a lighthouse")]
            # Both replicas' jobs and images are in the one database, each with the replica that ran it.
            page = await first.jobs(limit=10, offset=0)
            assert {job.id for job in page.items} == set(ids)
            assert [first.store.get_job(job_id).engine for job_id in ids] == ["app/EngineReplica#0",
                                                                             "app/EngineReplica#1"]
            images = await second.images(limit=10, offset=0, prompt="lighthouse")
            assert images.total == 2 and {image.job_id for image in images.items} == set(ids)
            recorded = await second.job(ids[0])  # a job the other replica ran, its result rebuilt from the PNG
            assert recorded.status.value == "succeeded" and recorded.result is not None
            assert recorded.result.images[0].size == (64, 64)

            # Each left an unfinished job behind; replica 0 restarts: only its own becomes interrupted.
            for job_id, engine in (("left-by-0", "app/EngineReplica#0"), ("left-by-1", "app/EngineReplica#1")):
                row = {key: value for key, value in _row(first.store, ids[0]).items() if key != "images"}
                first.store.save_job(row | {"id": job_id, "status": "running", "engine": engine})
        finally:
            await first.stop()
        restarted = LocalEngine(settings, name="app/EngineReplica#0")
        try:
            assert restarted.store.get_job("left-by-0").status == "interrupted"
            assert restarted.store.get_job("left-by-1").status == "running"
        finally:
            await restarted.stop()
            await second.stop()

    asyncio.run(scenario())


def _row(store: Store, job_id: str) -> dict:
    from models.jobs.store import JobRecord

    record = store.get_job(job_id)
    return {column.name: getattr(record, column.name) for column in JobRecord.__table__.columns}
