"""A training run started by the server stops when that server is gone, and never registers a model then.

The server passes its process id and start time to the run (environment variables, which `accelerate launch`
hands on to every worker). The run checks now and then that exactly that process is still alive; if it is not
(killed with -9, crashed), the run saves a checkpoint, stops, and registers nothing, so a later server finds a
truthful record instead of a model it never saw being made. A run launched by hand has no lifeline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil

PID_VARIABLE = "SDSERVE_SERVER_PID"
STARTED_VARIABLE = "SDSERVE_SERVER_STARTED"
CHECK_EVERY_S = 1.0


def process_started(pid: int) -> float | None:
    """A process's start time (the identity that survives pid reuse), None when it is gone."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.Error:
        return None


def server_environment() -> dict[str, str]:
    """What the server adds to a run's environment: itself."""
    started = process_started(os.getpid())
    return {PID_VARIABLE: str(os.getpid()), STARTED_VARIABLE: repr(started)}


@dataclass
class ServerLifeline:
    pid: int
    started: float
    _checked_at: float = field(default=0.0, repr=False)
    _alive: bool = field(default=True, repr=False)

    @classmethod
    def from_environment(cls) -> ServerLifeline | None:
        try:
            return cls(int(os.environ[PID_VARIABLE]), float(os.environ[STARTED_VARIABLE]))
        except (KeyError, ValueError):
            return None

    def alive(self, now: bool = False) -> bool:
        """Whether the server that started this run still runs (checked at most once a second unless `now`);
        once gone it stays gone."""
        if not self._alive:
            return False
        if now or time.monotonic() - self._checked_at >= CHECK_EVERY_S:
            self._checked_at = time.monotonic()
            started = process_started(self.pid)
            self._alive = started is not None and abs(started - self.started) < 0.01
        return self._alive
