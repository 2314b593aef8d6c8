"""Request and job ids in every log line.

The API's middleware sets the request id for the duration of a request; the worker sets the job id (and the id
of the request that submitted the job) while it runs that job. A filter on the log handler copies both onto each
record, so `%(request_id)s` and `%(job_id)s` work in any format string. Plain Python: models/ and api/ share it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

NO_ID = "-"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [req=%(request_id)s job=%(job_id)s] %(message)s"
HANDLER_NAME = "sdserve"
OUR_PACKAGES = ("api", "models", "training")

request_id_var: ContextVar[str | None] = ContextVar("sdserve_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("sdserve_job_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


@contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Tag the log lines written inside the block (in this thread or task) with these ids."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `job_id` to each record that passes the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or NO_ID
        if not hasattr(record, "job_id"):
            record.job_id = job_id_var.get() or NO_ID
        return True


def configure_logging(level: str = "INFO") -> logging.Handler:
    """Install one stderr handler on the root logger with the ids in its format, and set our packages' level.

    Idempotent: calling it again only changes the level. Other libraries keep the root's level (warnings), and
    uvicorn's loggers keep their own handlers.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(HANDLER_NAME)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RequestContextFilter())
        root.addHandler(handler)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(level.upper())
    return handler
