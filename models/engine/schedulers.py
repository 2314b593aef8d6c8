"""Scheduler selection by name. Every run gets a fresh scheduler built from the model's own config."""

from __future__ import annotations

from typing import Any

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from models.errors import InvalidRequest

# name -> (class, config overrides)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS)


def make_scheduler(name: str | None, model_config: Any) -> SchedulerMixin:
    """A new scheduler for one run: `name`'s class on the model's config, or the model's own class."""
    if name is None:
        return _class_named(model_config["_class_name"]).from_config(model_config)
    if name not in SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(model_config, **overrides)


def _class_named(class_name: str) -> type[SchedulerMixin]:
    return getattr(diffusers, class_name)
