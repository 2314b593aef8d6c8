"""The recorder: writes every job and its images to the database (and PNG files) on a thread of its own, in the
order the events happened, so neither the device nor the event loop ever waits for the disk."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.jobs.image_files import a1111_parameters, save_png, sdserve_metadata
from models.jobs.records import job_row
from models.jobs.store import ImageRecord, Store, from_timestamp
from models.settings import Settings
from models.types import JobEvent

if TYPE_CHECKING:
    from models.engine.worker import Job

logger = logging.getLogger(__name__)


class JobRecorder:
    """A worker observer: snapshots a job's row on the thread that caused the event, writes it later, in order."""

    def __init__(self, store: Store, settings: Settings, engine: str | None = None):
        self.store = store
        self.settings = settings
        self.engine = engine  # the engine replica's name, written on each row (None in one process)
        self._queue: queue.Queue[tuple[Job, str, dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="job-recorder", daemon=True)
        self._thread.start()

    def saves(self, job: Job) -> bool:
        return self.settings.save_images if job.options.save is None else job.options.save

    def __call__(self, job: Job, event: JobEvent) -> None:
        if event.kind == "progress" or (event.kind == "queued" and event.seq != 1):
            return
        if event.kind == "started":
            changes = {"id": job.id, "status": job.status.value, "started_at": from_timestamp(job.started_at)}
        else:
            changes = job_row(job, self.saves(job)) | ({"engine": self.engine} if self.engine else {})
        self._queue.put((job, event.kind, changes))

    def flush(self) -> None:
        """Wait until everything observed so far is written (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                job, kind, changes = item
                self.store.save_job(changes)
                if kind == "done" and self.saves(job):
                    self._save_images(job)
            except Exception:
                logger.exception("could not record job %s", item[0].id if item else "?")
            finally:
                self._queue.task_done()

    def _save_images(self, job: Job) -> None:
        result = job.result
        if result is None:
            return
        folder = Path(datetime.now(timezone.utc).strftime("images/%Y-%m-%d"))
        records = []
        for index, image in enumerate(result.images):
            relative = folder / f"{job.id}-{index}.png"
            parameters = a1111_parameters(result, index)
            metadata = sdserve_metadata(job.request, result, index, job.id)
            saved = save_png(image, self.settings.output_dir / relative, parameters, metadata)
            records.append(
                ImageRecord(
                    id=uuid.uuid4().hex, job_id=job.id, index=index, seed=result.seeds[index], width=image.width,
                    height=image.height, model=result.model, prompt=result.prompt,
                    negative_prompt=result.negative_prompt, path=relative.as_posix(), sha256=saved.sha256,
                    size_bytes=saved.size_bytes, parameters_text=parameters,
                    created_at=from_timestamp(job.finished_at),
                )
            )
        self.store.add_images(records)
        job.image_ids = tuple(record.id for record in records)
        logger.info("job %s: saved %d image(s) under %s", job.id, len(records), self.settings.output_dir / folder)
