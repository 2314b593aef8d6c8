"""POST /text2img, /img2img, /inpainting: validate, generate, answer.

They queue through the same engine as POST /jobs, so they are recorded, cached and cancellable alike.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import EngineDep
from api.schemas import GenerationResponse, Img2ImgBody, InpaintingBody, Text2ImgBody
from api.serving import answer_generation, cancel_on_disconnect

router = APIRouter(tags=["generation"])


@router.post("/text2img", response_model=GenerationResponse, summary="Generate images from a prompt")
@router.post("/text2img/", response_model=GenerationResponse, include_in_schema=False)
@cancel_on_disconnect
async def text2img(body: Text2ImgBody, request: Request, engine: EngineDep) -> GenerationResponse:
    return await answer_generation(engine, body, request.url.path)


@router.post("/img2img", response_model=GenerationResponse, summary="Transform an input image with a prompt")
@router.post("/img2img/", response_model=GenerationResponse, include_in_schema=False)
@cancel_on_disconnect
async def img2img(body: Img2ImgBody, request: Request, engine: EngineDep) -> GenerationResponse:
    return await answer_generation(engine, body, request.url.path)


@router.post("/inpainting", response_model=GenerationResponse, summary="Repaint the masked part of an image")
@router.post("/inpainting/", response_model=GenerationResponse, include_in_schema=False)
@cancel_on_disconnect
async def inpainting(
    body: InpaintingBody, request: Request, engine: EngineDep
) -> GenerationResponse:
    return await answer_generation(engine, body, request.url.path)
