"""Typed access to the objects the app's lifespan builds; tests can override them."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.serving import Answers
from models.interface import EngineClient
from models.settings import Settings
from training.datasets import DatasetStore
from training.runs import TrainingRunManager


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_answers(request: Request) -> Answers:
    return request.app.state.answers


def get_training(request: Request) -> TrainingRunManager:
    return request.app.state.training


def get_datasets(request: Request) -> DatasetStore:
    return request.app.state.training.datasets


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]
AnswersDep = Annotated[Answers, Depends(get_answers)]
TrainingDep = Annotated[TrainingRunManager, Depends(get_training)]
DatasetsDep = Annotated[DatasetStore, Depends(get_datasets)]
