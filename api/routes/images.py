"""Saved images: a paged, filterable list and the files themselves (looked up by id, never by path)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse

from api.deps import EngineDep
from api.job_schemas import MAX_OFFSET, ImageInfo, ImageList

router = APIRouter(prefix="/images", tags=["images"])
ImageId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="An id from GET /images or a job.")]


@router.get("", response_model=ImageList, summary="Saved images, newest first")
async def list_images(
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    model: Annotated[str | None, Query(max_length=200, description="Only this model's images.")] = None,
    prompt: Annotated[str | None, Query(max_length=500, description="Only prompts containing this text.")] = None,
) -> ImageList:
    page = await engine.images(limit, offset, model, prompt)
    return ImageList(images=[ImageInfo.from_snapshot(image) for image in page.items], total=page.total, limit=limit,
                     offset=offset)


@router.get(
    "/{image_id}",
    response_class=FileResponse,
    summary="The PNG file, with its generation parameters in text chunks",
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown id or file deleted"}},
)
async def get_image(image_id: ImageId, engine: EngineDep) -> FileResponse:
    _, path = await engine.image_file(image_id)
    return FileResponse(path, media_type="image/png", filename=path.name, content_disposition_type="inline")
