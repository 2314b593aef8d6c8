"""OpenAI Images API routes: translate in, generate, translate out (api/compat/openai.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile

from api.compat.openai import GenerationsBody, ImagesResponse, edits_body, generations_body, images_response
from api.compat.shared import upload_image
from api.deps import EngineDep
from api.serving import cancel_on_disconnect, generate

router = APIRouter(prefix="/v1/images", tags=["compatibility: OpenAI"])


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True)
@cancel_on_disconnect
async def generations(body: GenerationsBody, request: Request, engine: EngineDep) -> ImagesResponse:
    native = generations_body(body, await engine.registry())
    return await images_response(await generate(engine, native, request.url.path), body.response_format)


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True)
@cancel_on_disconnect
async def edits(
    request: Request,
    engine: EngineDep,
    image: Annotated[UploadFile, File()],
    prompt: Annotated[str, Form()],
    mask: Annotated[UploadFile | None, File()] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[Literal["b64_json", "url"], Form()] = "b64_json",
) -> ImagesResponse:
    picture = upload_image(await image.read(), "image")
    mask_picture = upload_image(await mask.read(), "mask") if mask is not None and mask.filename else None
    native = edits_body(await engine.registry(), picture, prompt, mask_picture, model, n, size)
    return await images_response(await generate(engine, native, request.url.path), response_format)
