"""Training datasets over HTTP: upload (a zip, or images with captions), list, show, delete. POST /train names
them by name (`"dataset": NAME`, or DreamBooth's `"instance_data_dir": NAME`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from starlette.concurrency import run_in_threadpool

from api.deps import DatasetsDep
from api.training_schemas import DatasetDescription, DatasetList
from training.datasets import Upload

router = APIRouter(prefix="/datasets", tags=["training"])


@router.get("", response_model=DatasetList, summary="Datasets in the datasets folder")
async def list_datasets(store: DatasetsDep) -> DatasetList:
    found = await run_in_threadpool(store.list)
    return DatasetList(datasets=[DatasetDescription.from_info(info) for info in found])


@router.get("/{name}", response_model=DatasetDescription, summary="One dataset")
async def show_dataset(name: str, store: DatasetsDep) -> DatasetDescription:
    return DatasetDescription.from_info(await run_in_threadpool(store.get, name))


@router.post("/{name}", response_model=DatasetDescription, status_code=status.HTTP_201_CREATED,
             summary="Upload a dataset: one .zip, or images with same-name .txt captions (or a metadata.jsonl)")
async def upload_dataset(
    name: str,
    store: DatasetsDep,
    response: Response,
    files: Annotated[list[UploadFile], File(description="One .zip, or the images and their captions.")],
    caption: Annotated[str | None, Form(max_length=1000,
                                        description="Caption for every image sent without one.")] = None,
    replace: Annotated[bool, Form(description="Replace a dataset of the same name.")] = False,
) -> DatasetDescription:
    uploads = [Upload(filename=file.filename or "", stream=file.file) for file in files]
    # Unpacking and decoding every image reads the disk and the CPU: off the event loop.
    info = await run_in_threadpool(store.add, name, uploads, caption, replace)
    response.headers["Location"] = f"/datasets/{info.name}"
    return DatasetDescription.from_info(info)


@router.delete("/{name}", response_model=DatasetDescription,
               summary="Delete a dataset (refused while a queued or running run reads it)")
async def delete_dataset(name: str, store: DatasetsDep) -> DatasetDescription:
    return DatasetDescription.from_info(await run_in_threadpool(store.delete, name))
