"""The Ray Serve application: an ingress deployment serving the HTTP app, and engine replicas behind it.

    serve run serve_config.yaml          # this machine; the config names `build_app` and sizes both deployments

`Ingress` serves the app an app factory builds (`api.app:create_app`, named in the config the way run_api.sh names
it to uvicorn: this package knows nothing of HTTP) with a `RayEngine` as its engine, so every route, compatibility
routes included, is the same as in one process. `EngineReplica` (models/cluster/replica.py) runs the generation;
each replica owns the device Ray gives it (`ray_actor_options: num_gpus: 1`, or CPUs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from models.cluster.client import RayEngine
from models.cluster.replica import EngineReplica
from models.settings import get_settings

DEFAULT_APP_FACTORY = "api.app:create_app"

# Defaults for one machine; serve_config.yaml (or a RayService) overrides any of them per deployment.
EngineReplicaDeployment = serve.deployment(
    EngineReplica,
    name="EngineReplica",
    num_replicas=1,
    ray_actor_options={"num_cpus": 1},
    # Jobs one replica holds at once (each is one streaming call): the running batch and a few waiting. Beyond
    # that Serve sends work to another replica; `max_queued_requests` bounds what waits for one (then 429).
    max_ongoing_requests=4,
    max_queued_requests=16,
    health_check_period_s=10,
)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
@serve.ingress()
class Ingress:
    """The HTTP app, its engine the replicas behind `replicas`."""

    def __init__(self, replicas: DeploymentHandle, app_factory: str = DEFAULT_APP_FACTORY):
        self._settings = get_settings()
        self._engine = RayEngine(replicas, self._settings)
        self._factory = _import(app_factory)

    def __serve_build_asgi_app__(self) -> Any:
        return self._factory(self._settings, engine=self._engine)


class AppArgs(BaseModel):
    """The `args:` of the application in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    app_factory: str = Field(DEFAULT_APP_FACTORY, description="module:function building the ASGI app")


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application `serve run` / `serve deploy` / a RayService start (`import_path` in serve_config.yaml)."""
    options = AppArgs.model_validate(args or {})
    return Ingress.bind(EngineReplicaDeployment.bind(), options.app_factory)


def _import(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
