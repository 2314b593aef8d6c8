"""OpenAI Images API routes: translate in, generate, translate out (api/compat/openai.py).

`n` up to 10 runs as several jobs of at most SDSERVE_MAX_IMAGES images when it is over that limit. Errors under
/v1/ are in OpenAI's shape (registered in api/app.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.compat import openai
from api.compat.openai import GenerationsBody, ImagesResponse, ModelObject, ModelsResponse, UrlSigner
from api.compat.shared import upload_image
from api.deps import EngineDep, SettingsDep
from api.schemas import GenerationBody
from api.serving import cancel_on_disconnect, generate_in_batches
from models.errors import ImageNotFound, ModelNotFound
from models.interface import EngineClient
from models.registry import BASE_KINDS
from models.settings import Settings

router = APIRouter(prefix="/v1", tags=["compatibility: OpenAI"])
ResponseFormat = Literal["b64_json", "url"]


def get_signer(request: Request) -> UrlSigner:
    return request.app.state.url_signer


SignerDep = Annotated[UrlSigner, Depends(get_signer)]


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
@cancel_on_disconnect
async def generations(body: GenerationsBody, request: Request, engine: EngineDep, settings: SettingsDep,
                      signer: SignerDep) -> ImagesResponse:
    native = openai.generations_body(body, await engine.registry())
    return await _answer(engine, settings, signer, request, native, body.response_format)


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
@cancel_on_disconnect
async def edits(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    signer: SignerDep,
    prompt: Annotated[str, Form()],
    image: Annotated[list[UploadFile] | None, File(description="The image to edit.")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]", description="Several images (refused).")] = None,
    mask: Annotated[UploadFile | None, File()] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "b64_json",
) -> ImagesResponse:
    uploads = [upload for upload in [*(image or []), *(images or [])] if upload.filename]
    pictures = [upload_image(await upload.read(), "image") for upload in uploads]
    mask_picture = upload_image(await mask.read(), "mask") if mask is not None and mask.filename else None
    native = openai.edits_body(await engine.registry(), pictures, prompt, mask_picture, model, openai.check_n(n),
                               size, response_format)
    return await _answer(engine, settings, signer, request, native, response_format)


@router.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True)
@cancel_on_disconnect
async def variations(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    signer: SignerDep,
    image: Annotated[UploadFile, File()],
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "b64_json",
) -> ImagesResponse:
    picture = upload_image(await image.read(), "image")
    native = openai.variations_body(await engine.registry(), picture, model, openai.check_n(n), size,
                                    response_format)
    return await _answer(engine, settings, signer, request, native, response_format)


async def _answer(engine: EngineClient, settings: Settings, signer: UrlSigner, request: Request,
                  native: GenerationBody, response_format: str) -> ImagesResponse:
    jobs = await generate_in_batches(engine, native, request.url.path, settings.max_images)
    urls = None
    if response_format == "url":
        ids = [image_id for job in jobs for image_id in await engine.saved_image_ids(job.id)]
        base = str(request.base_url).rstrip("/")
        urls = [base + signer.path(image_id) for image_id in ids]
    return await run_in_threadpool(openai.images_response, jobs, urls)


@router.get("/images/files/{image_id}", response_class=FileResponse, include_in_schema=False)
async def image_file(
    image_id: str, engine: EngineDep, signer: SignerDep, expires: Annotated[int, Query()],
    signature: Annotated[str, Query(max_length=128)],
) -> FileResponse:
    """A saved image behind a signed link from response_format=url (no credentials needed, until it expires)."""
    if not signer.check(image_id, expires, signature):
        raise ImageNotFound("this image link is unknown or has expired; ask for the image again")
    _, path = await engine.image_file(image_id)
    return FileResponse(path, media_type="image/png", content_disposition_type="inline")


@router.get("/models", response_model=ModelsResponse)
async def models(engine: EngineDep) -> ModelsResponse:
    return openai.models(await engine.registry())


@router.get("/models/{model_id}", response_model=ModelObject)
async def model(model_id: str, engine: EngineDep) -> ModelObject:
    entries = await engine.registry()
    found = next((item for item in openai.models(entries).data if item.id == model_id), None)
    if found is None:
        raise ModelNotFound(model_id, sorted(name for name, entry in entries.items() if entry.kind in BASE_KINDS))
    return found
