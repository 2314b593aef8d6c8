"""Scheduler selection by name. Every run gets a fresh scheduler built from the model's own config.

Diffusion models (SD 1.x, SDXL) take the classic samplers; flow-matching models (SD 3.x, FLUX) take the
flow-matching Euler sampler only (`flow_euler`, or `euler`, which on those models means the same).
"""

from __future__ import annotations

from typing import Any

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from models.errors import InvalidRequest
from models.families import Family

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
FLOW_MATCHING_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "euler": (FlowMatchEulerDiscreteScheduler, {}),
}


def scheduler_names() -> list[str]:
    """Every scheduler name some model family takes."""
    return sorted(SCHEDULERS.keys() | FLOW_MATCHING_SCHEDULERS.keys())


def _table(family: Family | None) -> dict[str, tuple[type[SchedulerMixin], dict[str, Any]]]:
    return FLOW_MATCHING_SCHEDULERS if family is not None and family.flow_matching else SCHEDULERS


def family_scheduler_names(family: Family) -> list[str]:
    return sorted(_table(family))


def scheduler_problem(name: str | None, family: Family, model: str) -> str | None:
    """Why `name` cannot run on `model` of `family`, or None when it can."""
    if name is None or name in _table(family):
        return None
    kind = "a flow-matching model" if family.flow_matching else "a diffusion model"
    return (f"scheduler {name!r} does not work with model {model!r} ({family.label}, {kind}); choose one of: "
            + ", ".join(family_scheduler_names(family)))


def make_scheduler(name: str | None, model_config: Any, family: Family | None = None) -> SchedulerMixin:
    """A new scheduler for one run: `name`'s class on the model's config, or the model's own class."""
    if name is None:
        return _class_named(model_config["_class_name"]).from_config(model_config)
    table = _table(family)
    if name not in table:
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of: {', '.join(sorted(table))}")
    scheduler_class, overrides = table[name]
    return scheduler_class.from_config(model_config, **overrides)


def _class_named(class_name: str) -> type[SchedulerMixin]:
    return getattr(diffusers, class_name)
