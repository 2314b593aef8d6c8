"""Training runs started by the server: validate at once, launch `accelerate launch` in the background, watch it.

Each run gets a folder `<output_dir>/training/<id>` holding its options (`options.json`), its log (`train.log`),
the script's progress lines (`progress.jsonl`), its record (`run.json`) and its outputs. Runs wait in a queue and
at most `training_max_running` run at once (one per device by default). A run is its own process group, so a
cancel reaches the launcher and every worker it started: SIGTERM first (the script checkpoints and exits), SIGKILL
after `training_stop_timeout_s`.

Requests may only name datasets, class-image folders and base paths inside the allowed folders
(`training_dirs`, default the datasets folder and the output folder); the server chooses the output folder.
Datasets can be uploaded into the datasets folder (`self.datasets`, training/datasets.py). A run that stopped
(cancelled, interrupted, failed) after a checkpoint can be resumed: it is queued again, same id and folder, and
its script continues from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import training
from models.errors import Conflict, InvalidRequest, ModelNotFound, NotReady, RegistryError, TrainingRunNotFound
from models.registry import BASE_KINDS, Registry, RegistryEntry
from models.settings import Settings
from models.sources import is_valid_name
from models.types import JobStatus
from training.base_model import BaseChoice
from training.checkpoints import latest_checkpoint
from training.config import SERVER_OWNED_OPTIONS, DreamBoothOptions, LoraOptions, TrainingOptions
from training.dataset_files import find_captioned_images, find_images
from training.datasets import DatasetStore, staging_leftovers
from training.lifeline import process_started, server_environment
from training.progress import PROGRESS_FILE, read_progress
from training.registration import check_registration

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(training.__file__).resolve().parent.parent
SCRIPTS = {"lora": "train_lora.py", "dreambooth": "train_dreambooth_lora.py"}
POLL_INTERVAL_S = 0.25
LOG_TAIL_CHARS = 4000
PROGRESS_TAIL_BYTES = 16_384
EVENTS_CHUNK_BYTES = 256 * 1024
RESUMABLE = (JobStatus.cancelled, JobStatus.interrupted, JobStatus.failed)
# Options naming folders a run reads; a dataset they name may not be deleted while the run is queued or running.
DATA_OPTIONS = ("dataset", "instance_data_dir", "class_data_dir")


@dataclass
class TrainingRun:
    id: str
    kind: str
    options: dict[str, Any]
    folder: Path
    state: JobStatus = JobStatus.queued
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    pid: int | None = None
    resumes: int = 0  # times it was queued again to continue from its last checkpoint
    # Set when the server stops a running run: the state and message it ends with once its processes are gone.
    stopping_as: tuple[JobStatus, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.folder / "train.log"

    @property
    def register_as(self) -> str | None:
        return self.options.get("register_as")

    def events(self) -> list[dict[str, Any]]:
        """The script's latest progress lines (the file grows with the run; its end is enough)."""
        return read_progress(self.folder / PROGRESS_FILE, tail_bytes=PROGRESS_TAIL_BYTES)

    def progress(self) -> dict[str, Any] | None:
        """The last step line of the script (step, max_steps, loss, lr, steps_per_s, epoch)."""
        return next((event for event in reversed(self.events()) if event.get("event") == "step"), None)

    def outcome(self) -> dict[str, Any] | None:
        return next((event for event in reversed(self.events()) if event.get("event") == "done"), None)

    def events_since(self, offset: int, max_bytes: int = EVENTS_CHUNK_BYTES) -> tuple[list[dict[str, Any]], int]:
        """The progress lines that start at byte `offset` (complete lines only, at most about `max_bytes`) and the
        offset to ask from next time: a page follows a run without reading its whole history again."""
        path = self.folder / PROGRESS_FILE
        try:
            with path.open("rb") as stream:
                stream.seek(max(0, offset))
                data = stream.read(max_bytes)
        except OSError:
            return [], offset
        end = data.rfind(b"\n") + 1
        events = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events, max(0, offset) + end

    def file(self, relative: str) -> Path | None:
        """A PNG of the run folder (validation images, loss.png, validation_grid.png), or None."""
        folder = self.folder.resolve()
        path = (folder / relative).resolve()
        if path.suffix.lower() != ".png" or not path.is_relative_to(folder) or not path.is_file():
            return None
        return path

    @property
    def resumable(self) -> bool:
        return self.state in RESUMABLE and latest_checkpoint(self.folder) is not None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            with self.log_path.open("rb") as stream:
                stream.seek(max(0, self.log_path.stat().st_size - chars))
                return stream.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "options": self.options, "state": self.state.value,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "exit_code": self.exit_code, "error": self.error, "pid": self.pid,
            "resumes": self.resumes,
            # The launcher's start time: with the pid, it tells a later server whether the process still runs.
            "pid_started": process_started(self.pid) if self.pid is not None and not self.state.finished else None,
        }


class TrainingRunManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        # Its own view of the registry file: runs register their outputs there, and the engine sees them.
        self.registry = Registry(settings.registry_path)
        self.root = Path(settings.output_dir) / "training"
        self._runs: OrderedDict[str, TrainingRun] = OrderedDict()
        self.datasets = DatasetStore(settings, in_use=self.run_using)
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="training-runs", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._load_history()
        for leftover in staging_leftovers(self.datasets.root):
            logger.info("removing %s, left by an interrupted dataset upload", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel queued runs and stop running ones (they checkpoint first): no training outlives the server."""
        with self._condition:
            self._stopping = True
            running = [run for run in self._runs.values() if run.state is JobStatus.running]
            for run in self._runs.values():
                if run.state is JobStatus.queued:
                    self._finish(run, JobStatus.interrupted, error="the server shut down before the run started")
                elif run.state is JobStatus.running:
                    run.stopping_as = (JobStatus.interrupted, "the server shut down during the run")
            self._condition.notify_all()
        self._thread.join(timeout=5)
        for run in running:
            self._terminate(run)
            self._reap(run)

    # -- requests ---------------------------------------------------------------------------------------------------
    def submit(self, options: TrainingOptions) -> TrainingRun:
        """Check everything that can be checked without the GPU, then queue the run. Raises SdserveError."""
        if self._stopping:
            raise NotReady("the server is shutting down")
        owned = sorted(set(SERVER_OWNED_OPTIONS) & options.model_fields_set)
        if owned:
            raise InvalidRequest(f"{', '.join(owned)}: chosen by the server for runs it starts; leave it out "
                                 "(POST /train/{id}/resume continues a stopped run from its last checkpoint)")
        options = self._checked(options)
        run_id = f"{options.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder = self.root / run_id
        options = options.model_copy(update={"run_id": run_id, "output_dir": folder.resolve()})
        with self._condition:
            self._check_name_free(options)
            folder.mkdir(parents=True)
            (folder / "options.json").write_text(options.model_dump_json(indent=2), encoding="utf-8")
            run = TrainingRun(id=run_id, kind=options.kind, options=options.model_dump(mode="json"), folder=folder)
            self._runs[run_id] = run
            self._save(run)
            self._start_queued()  # at once when the device is free, so the answer already says running
        logger.info("training run %s submitted (%s on %s): %s", run_id, options.kind, options.base, run.state.value)
        return run

    def get(self, run_id: str) -> TrainingRun:
        with self._condition:
            run = self._runs.get(run_id)
        if run is None:
            raise TrainingRunNotFound(f"no training run {run_id!r}")
        return run

    def list(self) -> list[TrainingRun]:
        with self._condition:
            return list(self._runs.values())

    def queue_position(self, run: TrainingRun) -> int | None:
        with self._condition:
            queued = [other for other in self._runs.values() if other.state is JobStatus.queued]
        return queued.index(run) + 1 if run in queued else None

    def resume(self, run_id: str) -> TrainingRun:
        """Queue a stopped run again; its script continues from the newest checkpoint in its folder."""
        if self._stopping:
            raise NotReady("the server is shutting down")
        run = self.get(run_id)
        with self._condition:
            if run.state not in RESUMABLE:
                raise Conflict(f"run {run_id} is {run.state.value}: only a cancelled, interrupted or failed run "
                               "can be resumed")
            checkpoint = latest_checkpoint(run.folder)
            if checkpoint is None:
                raise Conflict(f"run {run_id} stopped before its first checkpoint: nothing to resume (start it "
                               "again with POST /train)")
            options = dict(run.options, resume_from_checkpoint="latest")
            validated = (LoraOptions if run.kind == "lora" else DreamBoothOptions).model_validate(options)
            self._check_name_free(validated)
            check_registration(validated, self._base_of(options), self.registry)  # a name taken since
            (run.folder / "options.json").write_text(json.dumps(options, indent=2), encoding="utf-8")
            run.options = options
            run.state, run.error, run.exit_code, run.pid, run.process = JobStatus.queued, None, None, None, None
            run.finished_at, run.stopping_as = None, None
            run.resumes += 1
            self._runs.move_to_end(run_id)  # queued behind the runs already waiting
            self._save(run)
            self._start_queued()
        logger.info("training run %s resumed from %s: %s", run_id, checkpoint.name, run.state.value)
        return run

    def run_using(self, folder: Path) -> str | None:
        """The id of a queued or running run that reads `folder` (or a path inside it), if any."""
        with self._condition:
            runs = [run for run in self._runs.values() if run.state in (JobStatus.queued, JobStatus.running)]
        for run in runs:
            for option in DATA_OPTIONS:
                value = run.options.get(option)
                if value and Path(value).resolve().is_relative_to(folder):
                    return run.id
        return None

    def _base_of(self, options: dict[str, Any]) -> BaseChoice:
        base = str(options.get("base", "demo"))
        entry = self.registry.entries().get(base)
        if entry is not None and entry.kind in BASE_KINDS:
            return BaseChoice(requested=base, name=base, entry=entry)
        return BaseChoice(requested=base, name=None, entry=RegistryEntry(source=base))

    def cancel(self, run_id: str) -> TrainingRun:
        """Cancel a queued run, or stop a running one and wait until all of its processes are gone."""
        run = self.get(run_id)
        with self._condition:
            if run.state is JobStatus.queued:
                self._finish(run, JobStatus.cancelled, error="cancelled before it started")
                return run
            if run.state is not JobStatus.running:
                return run
            run.stopping_as = (JobStatus.cancelled, "cancelled")
        self._terminate(run)
        with self._condition:
            self._reap(run)
            self._condition.notify_all()
        return run

    # -- validation -------------------------------------------------------------------------------------------------
    def allowed_dirs(self) -> list[Path]:
        configured = self.settings.training_dirs or [self.settings.output_dir]
        # The datasets folder always: datasets uploaded through the API live there.
        folders = [Path(folder).expanduser().resolve() for folder in [self.settings.datasets_dir, *configured]]
        return list(dict.fromkeys(folders))

    def _checked(self, options: TrainingOptions) -> TrainingOptions:
        changes: dict[str, Any] = {}
        if isinstance(options, LoraOptions):
            changes["dataset"] = self._allowed_path(options.dataset, "dataset")
            find_captioned_images(changes["dataset"], options.image_column, options.caption_column,
                                  options.caption_extension)
        elif isinstance(options, DreamBoothOptions):
            changes["instance_data_dir"] = self._allowed_path(options.instance_data_dir, "instance_data_dir")
            if not find_images(changes["instance_data_dir"], "instance_data_dir"):
                raise InvalidRequest(f"instance_data_dir {options.instance_data_dir} has no images")
            if options.class_data_dir is not None:
                changes["class_data_dir"] = self._allowed_path(options.class_data_dir, "class_data_dir",
                                                               must_exist=False)
        entry = self.registry.entries().get(options.base)
        if entry is not None and entry.kind in BASE_KINDS:
            base = BaseChoice(requested=options.base, name=options.base, entry=entry)
        elif not is_valid_name(options.base):  # not a registry name, so a folder or file on disk
            changes["base"] = str(self._allowed_path(Path(options.base), "base"))
            base = BaseChoice(requested=options.base, name=None, entry=RegistryEntry(source=changes["base"]))
        else:
            raise ModelNotFound(options.base, self.registry.names(BASE_KINDS))
        check_registration(options, base, self.registry)
        return options.model_copy(update=changes)

    def _allowed_path(self, path: Path, option: str, must_exist: bool = True) -> Path:
        """Relative paths are read from the datasets folder; every path must stay inside an allowed folder."""
        datasets = Path(self.settings.datasets_dir).expanduser().resolve()
        resolved = (datasets / path).resolve() if not path.is_absolute() else path.resolve()
        allowed = self.allowed_dirs()
        if not any(resolved.is_relative_to(folder) for folder in allowed):
            raise InvalidRequest(
                f"{option} {path} is outside the folders training may use ({', '.join(map(str, allowed))}); "
                "put the data there or add its folder to SDSERVE_TRAINING_DIRS"
            )
        if must_exist and not resolved.exists():
            raise InvalidRequest(f"{option} {path} does not exist (looked for {resolved})")
        return resolved

    def _check_name_free(self, options: TrainingOptions) -> None:
        """No two runs in flight may register the same name (the registry itself was checked in _checked)."""
        name = options.register_as
        if name is None:
            return
        for other in self._runs.values():
            if other.state in (JobStatus.queued, JobStatus.running) and other.register_as == name:
                raise RegistryError(f"run {other.id} ({other.state.value}) will already register {name!r}")

    # -- the watcher thread -------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            with self._condition:
                if self._stopping:
                    return
                for run in self._runs.values():
                    if run.state is JobStatus.running:
                        self._reap(run)
                self._start_queued()
                self._condition.wait(POLL_INTERVAL_S)

    def _start_queued(self) -> None:
        running = sum(run.state is JobStatus.running for run in self._runs.values())
        for run in self._runs.values():
            if running >= self.settings.training_max_running:
                return
            if run.state is JobStatus.queued:
                self._launch(run)
                running += 1

    def _launch(self, run: TrainingRun) -> None:
        command = self.launch_command(run)
        environment = self._environment()
        logger.info("training run %s: %s", run.id, " ".join(command))
        try:
            with run.log_path.open("ab") as log:
                # Its own session and process group: a cancel signals the launcher and all its workers together.
                run.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=log,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
        except OSError as error:
            self._finish(run, JobStatus.failed, error=f"could not start accelerate: {error}")
            return
        run.pid = run.process.pid
        run.state = JobStatus.running
        run.started_at = time.time()
        self._save(run)

    def launch_command(self, run: TrainingRun) -> list[str]:
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        config = self.settings.training_accelerate_config
        if config is not None and Path(config).is_file():
            command += ["--config_file", str(Path(config).resolve())]
        command += list(self.settings.training_launch_args)
        # The script file, exactly as a user launches it by hand.
        script = PROJECT_ROOT / "training" / SCRIPTS[run.kind]
        return command + [str(script), "--config", str(run.folder / "options.json")]

    def _environment(self) -> dict[str, str]:
        """The script reads the same registry and builds demo models into the same cache as this server."""
        environment = dict(os.environ)
        python_path = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + python_path if python_path else "")
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(server_environment())  # the run stops, unregistered, if this server dies
        for name in ("registry_path", "cache_dir", "output_dir", "allow_downloads", "allow_pickle"):
            value = getattr(self.settings, name)
            environment[f"SDSERVE_{name.upper()}"] = str(Path(value).resolve()) if isinstance(value, Path) else (
                str(value).lower() if isinstance(value, bool) else str(value))
        return environment

    def _reap(self, run: TrainingRun) -> None:
        """Record how a run ended once its launcher has exited and no process of its group is left."""
        if run.state is not JobStatus.running or run.process is None or run.process.poll() is None:
            return
        if _group_members(run.pid):
            return  # workers still finishing (e.g. writing a checkpoint after SIGTERM)
        run.exit_code = run.process.returncode
        if run.stopping_as is not None:
            self._finish(run, *run.stopping_as)
        elif run.exit_code == 0:
            self._finish(run, JobStatus.succeeded)
        else:
            self._finish(run, JobStatus.failed, error=_failure_summary(run))

    def _terminate(self, run: TrainingRun) -> None:
        if run.pid is None:
            return
        _signal_group(run.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.training_stop_timeout_s
        while time.monotonic() < deadline:
            if run.process is not None:
                run.process.poll()
            if not _group_members(run.pid):
                break
            time.sleep(0.1)
        else:
            logger.warning("training run %s did not stop within %.0fs; killing it", run.id,
                           self.settings.training_stop_timeout_s)
            _signal_group(run.pid, signal.SIGKILL)
        if run.process is not None:
            try:
                run.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.error("training run %s: launcher %d did not exit after SIGKILL", run.id, run.pid)

    def _finish(self, run: TrainingRun, state: JobStatus, error: str | None = None) -> None:
        run.state = state
        run.error = error
        run.finished_at = time.time()
        self._save(run)
        logger.info("training run %s %s%s", run.id, state.value, f": {error}" if error else "")

    # -- persistence -----------------------------------------------------------------------------------------------
    def _save(self, run: TrainingRun) -> None:
        temporary = run.folder / ".run.json.tmp"
        temporary.write_text(json.dumps(run.record(), indent=2), encoding="utf-8")
        os.replace(temporary, run.folder / "run.json")

    def _load_history(self) -> None:
        """Runs of earlier server processes, for GET /train; ones that were unfinished are marked interrupted."""
        if not self.root.is_dir():
            return
        records = []
        for path in self.root.glob("*/run.json"):
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as error:
                logger.warning("ignoring unreadable training record %s: %s", path, error)
        for record in sorted(records, key=lambda item: item.get("created_at", 0)):
            try:
                run = TrainingRun(id=record["id"], kind=record["kind"], options=record["options"],
                                  folder=self.root / record["id"], state=JobStatus(record["state"]),
                                  created_at=record["created_at"], started_at=record.get("started_at"),
                                  finished_at=record.get("finished_at"), exit_code=record.get("exit_code"),
                                  error=record.get("error"), resumes=record.get("resumes", 0))
            except (KeyError, ValueError) as error:
                logger.warning("ignoring malformed training record %s: %s", record.get("id"), error)
                continue
            if not run.state.finished:
                self._reconcile(run, record)
            self._runs[run.id] = run

    def _reconcile(self, run: TrainingRun, record: dict[str, Any]) -> None:
        """A run an earlier server left unfinished (it crashed or was killed): stop what may still run of it,
        then record what really happened, from the run's own progress lines."""
        pid, started = record.get("pid"), record.get("pid_started")
        if isinstance(pid, int) and isinstance(started, float) and process_started(pid) == started:
            logger.warning("training run %s outlived the server that started it (pid %d); stopping it", run.id, pid)
            run.pid = pid
            self._terminate(run)
        outcome = run.outcome()
        if outcome is not None and outcome.get("registered"):
            # It finished and registered its model before its server went away: that is what happened.
            self._finish(run, JobStatus.succeeded)
            return
        stopped = next((event for event in reversed(run.events()) if event.get("event") == "stopped"), None)
        detail = "the server stopped during this run"
        if outcome is not None:
            detail += f"; it finished at step {outcome.get('step')} ({outcome.get('output')}) but registered nothing"
        elif stopped is not None:
            detail += f"; it stopped at step {stopped.get('step')} with checkpoint {stopped.get('checkpoint')}"
        self._finish(run, JobStatus.interrupted, error=detail)


def _group_members(group: int | None) -> list[int]:
    """Live (not zombie) processes of a process group."""
    if group is None:
        return []
    members = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _signal_group(group: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(group, number)


def _failure_summary(run: TrainingRun) -> str:
    """The script's own error line (it logs `ERROR ...: message` for bad input), else the end of the log."""
    lines = [line.strip() for line in run.log_tail().splitlines() if line.strip()]
    logged = [line for line in lines if " ERROR " in line]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    chosen = (logged or raised or lines or ["no output"])[-1]
    return f"exit status {run.exit_code}: {chosen[-500:]}"

