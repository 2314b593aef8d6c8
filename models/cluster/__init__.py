"""The engine across machines: the same API on Ray Serve (README "Scaling out").

Needs the `ray` extra (`pip install .[ray]`); nothing outside this package imports Ray, so the single-process
server (`./run_api.sh`) never loads it.

- `deployments.py`: the Serve application: an ingress deployment serving the HTTP app, and engine replicas.
- `replica.py`: one engine replica: a `LocalEngine` on its own device, its jobs streamed to the ingress.
- `client.py`: `RayEngine`, the `EngineClient` the ingress's app talks to; it reaches replicas through a
  `DeploymentHandle`, one streaming call per job.
- `routing.py`: the multiplexed model id a request is routed by (its model and LoRA set).
"""
