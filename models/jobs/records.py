"""Between jobs and database rows, both ways: a live job's row, and a recorded job (or image) as the same snapshot
a live one gives, its result rebuilt from the saved files."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from models.errors import ImageNotFound
from models.jobs.image_files import image_digest
from models.jobs.store import ImageRecord, JobRecord, from_timestamp
from models.types import (
    ActiveLora,
    ControlNetUse,
    GenerationRequest,
    GenerationResult,
    ImageSnapshot,
    JobOptions,
    JobSnapshot,
    JobStatus,
)

if TYPE_CHECKING:
    from models.engine.worker import Job


def job_row(job: Job, save_images: bool) -> dict[str, Any]:
    """Every column of the job's row as it stands now: what was asked, and once it ran, what ran."""
    request = job.request
    row: dict[str, Any] = {
        "id": job.id,
        "task": request.task,
        "status": job.status.value,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model": job.model,
        "model_sha256": None,
        "loras": [],
        "parameters": request_parameters(request),
        "seed": request.seed,
        "seed_origin": job.seed_origin,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "step": job.step,
        "total_steps": job.total_steps,
        "scheduler": request.scheduler,
        "guidance_scale": request.guidance_scale,
        "strength": request.strength,
        "output_format": job.options.output_format,
        "save_images": save_images,
        "cached": job.cached,
        "source": job.options.source,
        "error": job.error,
        "created_at": from_timestamp(job.created_at),
        "started_at": from_timestamp(job.started_at),
        "finished_at": from_timestamp(job.finished_at),
    }
    result = job.result
    if result is not None:
        row |= {
            "model": result.model,
            "model_sha256": result.model_sha256,
            "loras": [asdict(lora) for lora in result.loras],
            "prompt_used": result.prompt,
            "controlnet": _controlnets_column(result.controlnets),
            "family": result.family,
            "family_arguments": result.family_arguments,
            "guidance_scale": result.guidance_scale,
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
    if is_dataclass(value) and not isinstance(value, type):
        return {item.name: _jsonable(getattr(value, item.name)) for item in fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def snapshot_from_record(record: JobRecord, output_dir: Path, with_result: bool = True) -> JobSnapshot:
    """A recorded job as a snapshot; its result when it succeeded and its image files are all still there."""
    return JobSnapshot(
        id=record.id,
        task=record.task,  # type: ignore[arg-type]
        status=JobStatus(record.status),
        prompt=record.prompt,
        negative_prompt=record.negative_prompt,
        model=record.model,
        options=JobOptions(save=record.save_images, output_format=record.output_format, source=record.source or ""),
        seed_origin="client" if record.seed_origin == "client" else "drawn",
        created_at=record.created_at.timestamp(),
        started_at=record.started_at.timestamp() if record.started_at else None,
        finished_at=record.finished_at.timestamp() if record.finished_at else None,
        step=record.step,
        total_steps=record.total_steps,
        error=record.error,
        cached=record.cached,
        image_ids=tuple(image.id for image in record.images),
        result=_recorded_result(record, output_dir) if with_result else None,
    )


def _recorded_result(record: JobRecord, output_dir: Path) -> GenerationResult | None:
    if record.status != JobStatus.succeeded.value or not record.seeds or len(record.images) != len(record.seeds):
        return None
    try:
        images = [_read_pixels(image_path(output_dir, image)) for image in record.images]
    except (ImageNotFound, OSError):
        return None
    parameters = record.parameters or {}
    return GenerationResult(
        images=images,
        seeds=list(record.seeds),
        model=record.model,
        prompt=record.prompt_used or record.prompt,
        negative_prompt=record.negative_prompt,
        width=record.width or 0,
        height=record.height or 0,
        steps=record.steps,
        guidance_scale=record.guidance_scale or 0.0,
        strength=record.strength,
        scheduler=record.scheduler or "",
        scheduler_name=parameters.get("scheduler"),
        loras=tuple(ActiveLora(**{**lora, "trigger_words": tuple(lora.get("trigger_words", ()))})
                    for lora in record.loras or ()),
        controlnets=_controlnets_from_column(record.controlnet),
        model_sha256=record.model_sha256,
        timings=dict(record.timings or {}),
        family=record.family,
        family_arguments=dict(record.family_arguments or {}),
    )


def _controlnets_column(used: tuple[ControlNetUse, ...]) -> dict[str, Any] | list[dict[str, Any]] | None:
    """One ControlNet as an object (as rows written before multi-ControlNet have it), several as a list."""
    if not used:
        return None
    return asdict(used[0]) if len(used) == 1 else [asdict(item) for item in used]


def _controlnets_from_column(column: dict[str, Any] | list[dict[str, Any]] | None) -> tuple[ControlNetUse, ...]:
    if not column:
        return ()
    return tuple(ControlNetUse(**item) for item in (column if isinstance(column, list) else [column]))


def _read_pixels(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


def image_path(output_dir: Path, record: ImageRecord) -> Path:
    """The file of a recorded image, refusing anything that would lead outside the output folder."""
    root = output_dir.resolve()
    path = (root / record.path).resolve()
    if not path.is_relative_to(root):
        raise ImageNotFound(f"image {record.id}: its recorded path is outside the output folder")
    if not path.is_file():
        raise ImageNotFound(f"image {record.id}: the file {record.path} is no longer in the output folder")
    return path


def image_snapshot(record: ImageRecord) -> ImageSnapshot:
    return ImageSnapshot(
        id=record.id, job_id=record.job_id, index=record.index, model=record.model, prompt=record.prompt,
        negative_prompt=record.negative_prompt, seed=record.seed, width=record.width, height=record.height,
        sha256=record.sha256, size_bytes=record.size_bytes, path=record.path, parameters_text=record.parameters_text,
        created_at=record.created_at.timestamp(),
    )
