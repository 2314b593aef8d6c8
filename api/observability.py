"""HTTP middleware: a request id on every request and its log lines, and request metrics by route.

Both are plain ASGI middleware rather than BaseHTTPMiddleware, so streamed answers (SSE) pass through untouched
and the request id's context variable stays set while the endpoint, and everything it logs, runs.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.logcontext import log_context

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept when it is short and plain; anything else (log injection, huge values) gets a fresh one.
_ACCEPTABLE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
UNMATCHED_ROUTE = "<unmatched>"
# Probes and scrapers call these every few seconds; their access lines would drown the rest at INFO.
QUIET_ROUTES = frozenset({"/health", "/metrics", "/stats"})

access_logger = logging.getLogger("api.access")

HTTP_REQUESTS = Counter(
    "sdserve_http_requests", "HTTP requests by method, route template and status code.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "sdserve_http_request_duration_seconds",
    "Seconds from receiving a request to the end of its answer (a whole stream for SSE).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name.decode("latin-1").lower() == REQUEST_ID_HEADER.lower():
            candidate = value.decode("latin-1").strip()
            if _ACCEPTABLE_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Takes the client's X-Request-ID (or makes one), echoes it on the answer, and tags the log lines."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Counts requests and times them by route template (`/jobs/{job_id}`, not each id), and logs one line."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            HTTP_LATENCY.labels(method=method, route=route).observe(seconds)
            # Escaped so that a path with a newline in it cannot forge a log line.
            path = scope["path"].encode("unicode_escape").decode("ascii")
            level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
            access_logger.log(level, "%s %s -> %d in %.1f ms", method, path, status, seconds * 1000)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE
