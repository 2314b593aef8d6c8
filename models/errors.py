"""Domain errors. The API maps each class to one HTTP status in api/errors.py."""

from __future__ import annotations


class SdserveError(Exception):
    """Base class: the message is safe to show to the client."""


class InvalidRequest(SdserveError):
    """The request cannot be run as asked (bad size, image, parameter)."""


class ModelNotFound(SdserveError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        listed = ", ".join(known) if known else "none"
        super().__init__(f"unknown model {name!r}; registered models: {listed}")


class ModelUnavailable(SdserveError):
    """A registered model whose weights cannot be loaded here (not downloaded, broken, wrong format)."""


class PathNotAllowed(SdserveError):
    """A client-named file or folder outside the folders the server may read from."""


class AdapterNotFound(SdserveError):
    """A LoRA reference that names no registry entry, file, folder or cached repo; or no loaded adapter."""


class RegistryError(SdserveError):
    """The registry file is invalid, or an edit would make it so."""


class RegistryUnavailable(RegistryError):
    """The registry file is missing, empty or invalid on disk: nothing can be written until it is fixed."""


class ModelInUse(SdserveError):
    """The model cannot be removed now (the default model, which every request without `model` uses)."""


class QueueFull(SdserveError):
    def __init__(self, size: int, retry_after_s: int):
        self.retry_after_s = retry_after_s
        super().__init__(f"the generation queue is full ({size} waiting); retry in about {retry_after_s}s")


class JobCancelled(SdserveError):
    """The job was cancelled before it finished."""


class NotReady(SdserveError):
    """The engine is starting or shutting down."""


class ReplicaLost(NotReady):
    """The engine replica running a job stopped (its process died) before the job finished; it is not retried."""


class JobNotFound(SdserveError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class JobFinished(SdserveError):
    """The job already finished, so it cannot be cancelled."""


class ImageNotFound(SdserveError):
    """No saved image with that id, or its file is gone."""


class TrainingRunNotFound(SdserveError):
    """No training run has this id."""


class ControlNetNotFound(SdserveError):
    """A ControlNet name that is neither registered (kind controlnet) nor loaded; the message lists them."""


class Conflict(SdserveError):
    """The request clashes with the current state: a name already taken, a run or dataset in use or not in a
    state that allows it."""


class DatasetNotFound(SdserveError):
    """No dataset of that name in the datasets folder."""


class PayloadTooLarge(SdserveError):
    """An upload over the server's size or count limits."""
