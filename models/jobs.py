"""Jobs around the worker: answer repeated deterministic requests from a cache, record every job and image.

`JobService.submit` is how routes queue a generation. The worker reports each job's events to the service's
observer, which fills the result cache and hands the events to the `JobRecorder`, a thread of its own that writes
the database and saves PNG files in order, so neither the device nor the event loop ever waits for the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from models.engine import GenerationRequest, GenerationResult
from models.image_files import AdapterUse, a1111_parameters, image_digest, save_png, sdserve_metadata
from models.registry import Registry
from models.settings import Settings
from models.store import ImageRecord, JobRecord, Store, from_timestamp
from models.worker import GenerationWorker, Job, JobEvent

logger = logging.getLogger(__name__)

INTERRUPTED_REASON = "the server stopped before this job finished"


@dataclass(frozen=True)
class JobOptions:
    """How a job is handled around the generation itself."""

    save: bool | None = None  # save the images; None: SDSERVE_SAVE_IMAGES
    explicit_seed: bool = False  # the client chose the seed, so the result is reproducible and cacheable
    output_format: str = "png"  # how the client wants its images encoded (files are always PNG)
    source: str = "jobs"  # the route that submitted it


@dataclass
class _Context:
    """What the service works out once per job at submission, kept in job.context["service"]."""

    options: JobOptions
    save: bool
    model: str
    model_sha256: str | None
    loras: list[AdapterUse]
    parameters: dict[str, Any]
    cache_key: str | None = None
    cached: bool = False
    saved: list[str] = field(default_factory=list)  # image ids, once the recorder has written them


class ResultCache:
    """A bounded LRU of finished results, keyed by everything that determines the pixels."""

    def __init__(self, size: int):
        self.size = size
        self._results: OrderedDict[str, GenerationResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def get(self, key: str) -> GenerationResult | None:
        with self._lock:
            result = self._results.get(key)
            if result is None:
                self.misses += 1
                return None
            self._results.move_to_end(key)
            self.hits += 1
            return result

    def put(self, key: str, result: GenerationResult) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._results[key] = result
            self._results.move_to_end(key)
            while len(self._results) > self.size:
                self._results.popitem(last=False)

    def __len__(self) -> int:
        return len(self._results)


class JobService:
    def __init__(self, settings: Settings, worker: GenerationWorker, store: Store, registry: Registry):
        self.settings = settings
        self.worker = worker
        self.store = store
        self.registry = registry
        self.cache = ResultCache(settings.result_cache_size)
        interrupted = store.mark_interrupted(INTERRUPTED_REASON)
        if interrupted:
            logger.warning("%d job(s) left unfinished by the last run are marked interrupted", interrupted)
        self.recorder = JobRecorder(store, settings, self.context_of)
        worker.add_observer(self._observe)

    def close(self, timeout: float = 30.0) -> None:
        self.recorder.close(timeout)

    def submit(self, request: GenerationRequest, options: JobOptions, **context: Any) -> Job:
        """Queue `request` (or answer it from the cache); raises QueueFull, InvalidRequest like worker.submit.

        Call it off the event loop: it hashes input images and reads the registry.
        """
        service = self._prepare(request, options)
        key = self._cache_key(service) if options.explicit_seed and self.cache.enabled else None
        service.cache_key = key
        cached = self.cache.get(key) if key else None
        if cached is not None:
            service.cached = True
            result = replace(cached, timings={"queued_s": 0.0, "inference_s": 0.0})
            return self.worker.add_finished(request, result, {**context, "service": service})
        return self.worker.submit(request, {**context, "service": service})

    def live(self, job_id: str) -> Job | None:
        """The job while the worker still remembers it (queued, running, or one of the last finished)."""
        return self.worker.job(job_id)

    def record(self, job_id: str) -> JobRecord | None:
        return self.store.get_job(job_id)

    def context_of(self, job: Job) -> _Context:
        """The job's service context; jobs queued on the worker directly get one worked out now."""
        service = job.context.get("service")
        if service is None:
            service = self._prepare(job.request, JobOptions(source="worker"))
            job.context["service"] = service
        return service

    def is_cached(self, job: Job) -> bool:
        service = job.context.get("service")
        return bool(service and service.cached)

    # -- internals --------------------------------------------------------------------------------------------
    def _prepare(self, request: GenerationRequest, options: JobOptions) -> _Context:
        model = request.model or self.settings.default_model
        entries = self.registry.entries()
        model_entry = entries.get(model)
        loras = [
            AdapterUse(name=name, scale=scale, sha256=entries[name].sha256 if name in entries else None,
                       weight_name=weight_name)
            for name, scale, weight_name in _adapters_of(request)
        ]
        return _Context(
            options=options,
            save=self.settings.save_images if options.save is None else options.save,
            model=model,
            model_sha256=model_entry.sha256 if model_entry else None,
            loras=loras,
            parameters=request_parameters(request),
        )

    def _cache_key(self, service: _Context) -> str | None:
        # The registry entries matter as much as the names: a re-registered model makes other pixels.
        entries = self.registry.entries()
        if any(lora.name not in entries for lora in service.loras):
            return None  # a LoRA by path or preloaded name can change on disk behind the same name
        controlnet = (service.parameters.get("controlnet") or {}).get("name")
        if controlnet is not None and controlnet not in entries:
            return None  # a ControlNet loaded with /load-controlnet/ can be replaced under the same name
        names = [service.model, *(lora.name for lora in service.loras), *([controlnet] if controlnet else [])]
        identity = {
            "parameters": service.parameters,
            "model": service.model,
            "entries": {name: entries[name].model_dump(mode="json") for name in names if name in entries},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _observe(self, job: Job, event: JobEvent) -> None:
        if event.kind == "done":
            service = job.context.get("service")
            if service is not None and service.cache_key and not service.cached:
                self.cache.put(service.cache_key, event.data["result"])
        self.recorder.observe(job, event)


class JobRecorder:
    """Writes jobs and their images to the store on its own thread, in the order the events happened."""

    def __init__(self, store: Store, settings: Settings, context_of: Any):
        self.store = store
        self.settings = settings
        self._context_of = context_of
        self._queue: queue.Queue[tuple[Job, str, dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="job-recorder", daemon=True)
        self._thread.start()

    def observe(self, job: Job, event: JobEvent) -> None:
        """Called on the thread that caused the event: take a snapshot now, write it later."""
        if event.kind == "progress" or (event.kind == "queued" and event.seq != 1):
            return
        if event.kind == "started":
            changes = {"id": job.id, "status": job.state.value, "started_at": from_timestamp(job.started_at)}
        else:
            changes = job_row(job, self._context_of(job))
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
                if kind == "done":
                    self._save_images(job)
            except Exception:
                logger.exception("could not record job %s", item[0].id if item else "?")
            finally:
                self._queue.task_done()

    def _save_images(self, job: Job) -> None:
        service = self._context_of(job)
        result = job.result
        if not service.save or result is None:
            return
        folder = Path(datetime.now(timezone.utc).strftime("images/%Y-%m-%d"))
        records = []
        for index, image in enumerate(result.images):
            relative = folder / f"{job.id}-{index}.png"
            parameters = a1111_parameters(job.request, result, index, service.model_sha256, service.loras)
            metadata = sdserve_metadata(job.request, result, index, service.model_sha256, service.loras, job.id)
            saved = save_png(image, self.settings.output_dir / relative, parameters, metadata)
            records.append(
                ImageRecord(
                    id=uuid.uuid4().hex,
                    job_id=job.id,
                    index=index,
                    seed=result.seeds[index],
                    width=image.width,
                    height=image.height,
                    model=result.model,
                    prompt=job.request.prompt,
                    negative_prompt=job.request.negative_prompt,
                    path=relative.as_posix(),
                    sha256=saved.sha256,
                    size_bytes=saved.size_bytes,
                    parameters_text=parameters,
                    created_at=from_timestamp(job.finished_at),
                )
            )
        self.store.add_images(records)
        service.saved = [record.id for record in records]
        logger.info("job %s: saved %d image(s) under %s", job.id, len(records), self.settings.output_dir / folder)


def job_row(job: Job, service: _Context) -> dict[str, Any]:
    """Every column of the job's row as it stands now."""
    request = job.request
    row: dict[str, Any] = {
        "id": job.id,
        "task": request.task,
        "status": job.state.value,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model": service.model,
        "model_sha256": service.model_sha256,
        "loras": [asdict(lora) for lora in service.loras],
        "parameters": service.parameters,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "step": job.step,
        "total_steps": job.total_steps,
        "scheduler": request.scheduler,
        "guidance_scale": request.guidance_scale,
        "strength": request.strength,
        "output_format": service.options.output_format,
        "save_images": service.save,
        "cached": service.cached,
        "source": service.options.source,
        "error": job.error,
        "created_at": from_timestamp(job.created_at),
        "started_at": from_timestamp(job.started_at),
        "finished_at": from_timestamp(job.finished_at),
    }
    result = job.result
    if result is not None:
        row |= {
            "model": result.model,
            "seeds": result.seeds,
            "width": result.width,
            "height": result.height,
            "scheduler": result.scheduler,
            "strength": result.strength,
            "timings": result.timings,
        }
    return row


def request_parameters(request: GenerationRequest) -> dict[str, Any]:
    """Every field of the request as JSON; input images by their pixel digest and size."""
    return {item.name: _jsonable(getattr(request, item.name)) for item in fields(request)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Image.Image):
        return {"digest": image_digest(value), "width": value.width, "height": value.height, "mode": value.mode}
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump())
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _adapters_of(request: GenerationRequest) -> list[tuple[str, float | None, str | None]]:
    """(name, scale, weight_name) of the LoRAs a request asks for, whatever shape the request gives them."""
    found: list[tuple[str, float | None, str | None]] = []
    for item in getattr(request, "loras", None) or []:
        if isinstance(item, str):
            found.append((item, None, None))
            continue
        data = item if isinstance(item, dict) else _jsonable(item)
        if isinstance(data, dict) and data.get("name"):
            scale = data.get("scale", data.get("weight"))
            weight_name = data.get("weight_name")
            found.append((str(data["name"]), float(scale) if isinstance(scale, int | float) else None,
                          str(weight_name) if weight_name else None))
    return found
