"""Which engine the API talks to: the composition root's one choice, made from the settings."""

from __future__ import annotations

from models.interface import EngineClient
from models.settings import Settings


def open_engine(settings: Settings) -> EngineClient:
    """The engine the settings ask for: today the in-process one."""
    # Imported here so that importing this module (the app factory does) loads no torch until an engine is built.
    from models.local import LocalEngine

    return LocalEngine(settings)
