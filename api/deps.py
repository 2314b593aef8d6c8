"""Typed access to the objects the app's lifespan builds; tests can override them."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.job_views import JobResults
from models.jobs import JobService
from models.registry import Registry
from models.settings import Settings
from models.training_runs import TrainingRunManager
from models.worker import GenerationWorker


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_worker(request: Request) -> GenerationWorker:
    return request.app.state.worker


def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


def get_job_results(request: Request) -> JobResults:
    return request.app.state.job_results


def get_training(request: Request) -> TrainingRunManager:
    return request.app.state.training


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
WorkerDep = Annotated[GenerationWorker, Depends(get_worker)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
JobResultsDep = Annotated[JobResults, Depends(get_job_results)]
TrainingDep = Annotated[TrainingRunManager, Depends(get_training)]
