"""Who may reach the server and what they may change: API keys, admin keys, Host and Origin checks.

Two pieces, each declared once:

- `SecurityMiddleware` (pure ASGI, before any body is read): refuses a Host the server does not answer to (400),
  a cross-site request that would change something (403: a web page posting a form or calling fetch from another
  origin), and, when keys are configured, a request without a valid key (401). It puts the caller's `Principal`
  on the request (and in a context variable, so the jobs it submits record their owner).
- `authorize`, a dependency that `create_app` declares on every router: routes that change the server (the
  registry, LoRAs and ControlNets loaded ahead, training, deleting) need an admin key. It also declares the
  security schemes in the OpenAPI schema, so generated clients send the key.

With no key configured every caller is an anonymous admin, as before; the start-up log warns when such a server
listens beyond the loopback interface.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import socket
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Security
from fastapi.openapi.models import APIKey, APIKeyIn, HTTPBase
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.openapi.models import SecurityBase as SecurityBaseModel
from fastapi.security.base import SecurityBase
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from models.settings import Settings
from models.types import JobSnapshot

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Open without a key: what a load balancer probes, the page's own files (it asks for the key itself), the docs.
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                          "/favicon.ico"})
# Signed image links of OpenAI `url` answers carry their own signature (and expiry), as OpenAI's do.
PUBLIC_PREFIXES = ("/static/", "/v1/images/files/")
# Every key holder may generate and follow, cancel or interrupt their own jobs. Every other route that is not a
# plain read needs an admin key (so a route added later is admin-only until it is listed here).
USER_WRITES = frozenset({
    ("POST", "/text2img"), ("POST", "/text2img/"), ("POST", "/img2img"), ("POST", "/img2img/"),
    ("POST", "/inpainting"), ("POST", "/inpainting/"), ("POST", "/jobs"), ("DELETE", "/jobs/{job_id}"),
    ("POST", "/generate"), ("POST", "/generate/"), ("POST", "/submit"), ("POST", "/imagine"),
    ("POST", "/generate-image/"), ("POST", "/generate-image"),
    ("POST", "/api/image_model_domain/v1/random_diffusion/1/initialize_diffusion"),
    ("POST", "/api/image_model_domain/v1/random_diffusion/1/initialize_diffusion/"),
    ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("POST", "/v1/images/variations"),
    ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("POST", "/sdapi/v1/interrupt"),
    ("POST", "/sdapi/v1/skip"), ("POST", "/sdapi/v1/png-info"), ("POST", "/controlnet/detect"),
    # A1111 clients choose their checkpoint this way (webuiapi's util_set_model); a registered model only.
    ("POST", "/sdapi/v1/options"),
})
# Reads that only an admin may do: training runs name datasets and paths on the server, and their logs; the
# datasets themselves.
ADMIN_READ_PREFIXES = ("/train", "/datasets")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(frozen=True)
class Principal:
    """The caller: which key (by fingerprint, never the key itself) and whether it is an admin key."""

    key_id: str | None
    admin: bool


ANONYMOUS = Principal(key_id=None, admin=True)  # no keys configured: everyone may do everything
principal_var: ContextVar[Principal] = ContextVar("sdserve_principal", default=ANONYMOUS)


def current_owner() -> str | None:
    """The key id of the request being handled; jobs it submits record it as their owner."""
    return principal_var.get().key_id


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Keys:
    """The configured keys, compared in constant time."""

    def __init__(self, settings: Settings):
        self.users = [key.get_secret_value().encode() for key in settings.api_keys]
        self.admins = [key.get_secret_value().encode() for key in settings.admin_keys]

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.admins)

    def identify(self, candidates: list[str]) -> Principal | None:
        """The principal of the first candidate that is a key. Every candidate is compared with every key (no
        early exit), so the time taken says nothing about how much of a key was right."""
        found: Principal | None = None
        for candidate in candidates:
            given = candidate.encode("utf-8", "surrogateescape")
            admin = any([hmac.compare_digest(given, key) for key in self.admins])  # noqa: C419 - all compared
            user = any([hmac.compare_digest(given, key) for key in self.users])  # noqa: C419
            if found is None and (admin or user):
                found = Principal(key_id=key_id(candidate), admin=admin)
        return found


def credentials(headers: Headers) -> list[str]:
    """What a client may send a key as: `Authorization: Bearer KEY` (the openai SDK), `X-API-Key: KEY`, or HTTP
    basic auth (AUTOMATIC1111's --api-auth, as webuiapi sends it) whose password, or user:password, is the key."""
    found = []
    if headers.get(API_KEY_HEADER):
        found.append(headers[API_KEY_HEADER].strip())
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(value.strip())
    elif scheme.lower() == "basic" and value.strip():
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return found
        found += [password, f"{user}:{password}"]
    return [candidate for candidate in found if candidate]


# -- Host and Origin --------------------------------------------------------------------------------------------
def host_allowed(host: str, allowed: list[str] | None) -> bool:
    """Whether the server answers to this Host header (port removed, lower case).

    The default allows IP addresses and names without a dot (localhost, a container or machine name): a page on
    another domain that points its name at this server (DNS rebinding) needs a dotted name, so it is refused."""
    name = _host_name(host)
    if allowed is None:
        return _is_ip(name) or "." not in name or name.endswith(".localhost") or name == _machine_fqdn()
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def cross_site_refusal(headers: Headers, allowed_origins: list[str]) -> str | None:
    """Why a state-changing request comes from another site (a form or script on a foreign page); None when it
    comes from this server's own page, an allowed origin, or a program (no Origin / Sec-Fetch-Site header)."""
    origin = headers.get("origin")
    if origin is not None:
        origin = origin.strip().lower()
        if "*" in allowed_origins or origin in allowed_origins:
            return None
        if origin != "null" and _netloc(urlsplit(origin)) == _normal_host(headers.get("host", ""), origin):
            return None
        return f"a page at {origin[:100]} may not change this server"
    site = headers.get("sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return "a page on another site may not change this server"
    return None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_FQDN: list[str] = []


def _machine_fqdn() -> str:
    if not _FQDN:
        _FQDN.append(socket.getfqdn().lower())
    return _FQDN[0]


def _netloc(parts: Any) -> str:
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return ""
    host = (parts.hostname or "").lower()
    return host if port in (None, default) else f"{host}:{port}"


def _normal_host(host: str, origin: str) -> str:
    """The Host header in the Origin's terms: a default port of the Origin's scheme is left out."""
    return _netloc(urlsplit(f"{urlsplit(origin).scheme}://{host.strip().lower()}"))


def is_loopback(host: str | None) -> bool:
    if host is None:
        return True
    name = _host_name(host)
    if name in LOOPBACK_NAMES:
        return True
    return _is_ip(name) and ipaddress.ip_address(name).is_loopback


# -- the middleware ---------------------------------------------------------------------------------------------
class SecurityMiddleware:
    """Host check, cross-site check for state-changing requests, then the key (when keys are configured)."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self.keys = Keys(settings)
        self._warned_open = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        principal = ANONYMOUS
        if self.keys.enabled and not _is_public(scope["path"]):
            found = self.keys.identify(credentials(headers))
            if found is None:
                await _error(401, "an API key is needed: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                             {"WWW-Authenticate": 'Bearer realm="sdserve"'})(scope, receive, send)
                return
            principal = found
        elif not self.keys.enabled:
            self._warn_if_reached_from_outside(scope)
        scope.setdefault("state", {})["principal"] = principal
        token = principal_var.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            principal_var.reset(token)

    def _refusal(self, scope: Scope, headers: Headers) -> ASGIApp | None:
        host = headers.get("host", "")
        if not host_allowed(host, self.settings.allowed_hosts):
            logger.warning("refused Host %r (SDSERVE_ALLOWED_HOSTS)", host[:100])
            return _error(400, f"this server does not answer to host {_host_name(host)[:100]!r}; "
                          "its operator can add it to SDSERVE_ALLOWED_HOSTS")
        if scope["method"] not in SAFE_METHODS:
            why = cross_site_refusal(headers, self.settings.allowed_origins)
            if why is not None:
                logger.warning("refused a cross-site %s %s: %s", scope["method"], scope["path"][:200], why)
                return _error(403, f"cross-site request refused: {why}; its operator can add the page's origin "
                              "to SDSERVE_ALLOWED_ORIGINS")
        return None

    def _warn_if_reached_from_outside(self, scope: Scope) -> None:
        client = scope.get("client")
        if self._warned_open or not client or not _is_ip(str(client[0])) or is_loopback(str(client[0])):
            return
        self._warned_open = True
        logger.warning("a request came from %s and no API key is configured: anyone who can reach this port "
                       "administers the server (set SDSERVE_API_KEYS and SDSERVE_ADMIN_KEYS)", client[0])


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> ASGIApp:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        # In the shape of the surface the path belongs to (OpenAI's clients read {"error": {...}} under /v1/).
        await error_response(scope, status, {"detail": detail}, headers)(scope, receive, send)

    return answer


def warn_if_exposed(settings: Settings) -> None:
    """At start-up: a server listening beyond the loopback interface without keys is open to its network."""
    if settings.auth_enabled:
        if not settings.admin_keys:
            logger.info("API keys are set but no admin key: nobody can change the registry, LoRAs or training")
        return
    if not is_loopback(settings.host):
        logger.warning(
            "listening on %s without API keys: anyone who can reach this port can generate, read every job and "
            "image, change the registry and start training. Set SDSERVE_API_KEYS and SDSERVE_ADMIN_KEYS, or "
            "listen on 127.0.0.1 (README, Security)", settings.host,
        )


# -- authorization: declared once per router --------------------------------------------------------------------
class _Documented(SecurityBase):
    """A security scheme for the OpenAPI schema only: the middleware has already checked the credentials."""

    def __init__(self, model: SecurityBaseModel, scheme_name: str):
        self.model = model
        self.scheme_name = scheme_name

    async def __call__(self) -> None:
        return None


_SCHEMES = (
    _Documented(HTTPBearerModel(description="An API key (SDSERVE_API_KEYS or SDSERVE_ADMIN_KEYS)."), "bearer"),
    _Documented(APIKey(**{"in": APIKeyIn.header}, name=API_KEY_HEADER, description="An API key."), "apiKey"),
    _Documented(HTTPBase(scheme="basic", description="AUTOMATIC1111 --api-auth style: the password (or "
                         "user:password) is an API key."), "basic"),
)


def needs_admin(method: str, route_path: str) -> bool:
    if route_path.startswith(ADMIN_READ_PREFIXES):
        return True
    return method not in SAFE_METHODS and (method, route_path) not in USER_WRITES


def principal_of(request: Request) -> Principal:
    return request.scope.get("state", {}).get("principal", ANONYMOUS)


async def _authorize(request: Request) -> Principal:
    """Admin-only routes refuse a key that is not an admin key (the middleware already refused a missing key)."""
    principal = principal_of(request)
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    if not principal.admin and needs_admin(request.method, path):
        raise HTTPException(403, "this route changes the server: it needs an admin key (SDSERVE_ADMIN_KEYS)")
    return principal


def authorize(settings: Settings, public: bool = False) -> list[Any]:
    """The dependencies every router is included with. With keys configured they also declare the security
    schemes (any one of them will do), so the OpenAPI schema tells clients to send a key; not for a `public`
    router (/health)."""
    documented = [Security(scheme) for scheme in _SCHEMES] if settings.auth_enabled and not public else []
    return [Depends(_authorize), *documented]


def check_may_cancel(request: Request, job: JobSnapshot) -> None:
    """A key may cancel or interrupt its own jobs; an admin key (or no keys configured) any job."""
    principal = principal_of(request)
    if principal.admin or job.options.owner == principal.key_id:
        return
    raise HTTPException(403, "this job was submitted with another key; only an admin key may cancel it")
