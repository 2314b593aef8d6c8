"""Keys, admin keys, Host and Origin checks, CORS, the start-up warning (issue 10, point 1), on the fake engine."""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.app import create_app
from api.security import USER_WRITES, needs_admin
from models.settings import Settings
from tests.conftest import ROOT
from tests.fake_engine import FakeEngine
from tests.utils import wait_for

USER_KEY = "user-key-0123456789"
OTHER_KEY = "other-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
GOOD = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}


def keyed_settings(tmp_path: Path, **extra) -> Settings:
    return Settings(registry_path=tmp_path / "registry.yaml", data_dir=tmp_path / "data", output_dir=tmp_path / "out",
                    device="cpu", api_keys=f"{USER_KEY},{OTHER_KEY}", admin_keys=ADMIN_KEY, **extra)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def keyed(tmp_path: Path, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(keyed_settings(tmp_path), engine=engine)) as client:
        yield client


def routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path template) of every API route, those of included routers too."""
    found: list[tuple[str, str]] = []

    def walk(candidates) -> None:
        for route in candidates:
            if isinstance(route, APIRoute):
                found.extend((method, route.path) for method in sorted(route.methods))
            elif hasattr(route, "original_router"):  # FastAPI keeps included routers whole
                walk(route.original_router.routes)

    walk(client.app.routes)
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "0123456789abcdef0123456789abcdef", path)


# -- keys --------------------------------------------------------------------------------------------------------
def test_every_route_but_the_public_ones_needs_a_key(keyed):
    public = {"/health", "/"}
    checked = 0
    for method, path in routes(keyed):
        response = keyed.request(method, concrete(path))
        if path in public or path.startswith("/v1/images/files/"):  # signed links carry their own signature
            assert response.status_code != 401, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = response.json()
        if path.startswith("/v1/"):  # OpenAI's shape, which its SDK reads as AuthenticationError
            assert body["error"]["code"] == "invalid_api_key" and "API key" in body["error"]["message"]
        else:
            assert "API key" in body["detail"]
        checked += 1
    assert checked > 40
    assert keyed.get("/openapi.json").status_code == 200 and keyed.get("/static/app.js").status_code == 200
    assert keyed.get("/health").status_code == 200


@pytest.mark.parametrize("headers", [
    bearer(USER_KEY),
    {"X-API-Key": USER_KEY},
    # webuiapi's set_auth / A1111 --api-auth: HTTP basic, the password or user:password is the key.
    {"Authorization": "Basic " + base64.b64encode(f"someone:{USER_KEY}".encode()).decode()},
])
def test_each_way_a_client_sends_a_key_works(keyed, headers):
    assert keyed.get("/models", headers=headers).status_code == 200
    assert keyed.post("/text2img", json=GOOD, headers=headers).status_code == 200


def test_basic_auth_with_user_and_password_as_the_key(tmp_path):
    settings = keyed_settings(tmp_path).model_copy(update={"api_keys": Settings(api_keys="alice:s3cret-pass").api_keys})
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        good = base64.b64encode(b"alice:s3cret-pass").decode()
        wrong = base64.b64encode(b"bob:s3cret-pass").decode()
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {good}"}).status_code == 200
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {wrong}"}).status_code == 401


@pytest.mark.parametrize("headers", [
    bearer("nope"), bearer(USER_KEY[:-1]), bearer(USER_KEY + "x"), {"X-API-Key": ""},
    {"Authorization": "Basic !!!not-base64"}, {"Authorization": USER_KEY},
])
def test_wrong_keys_are_refused(keyed, headers):
    assert keyed.get("/models", headers=headers).status_code == 401


def test_keys_come_from_a_file_too(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# the team's keys\nfile-key-0123456789\n\n")
    settings = Settings(registry_path=tmp_path / "r.yaml", data_dir=tmp_path / "d", api_keys_file=keys)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        assert client.get("/models", headers=bearer("file-key-0123456789")).status_code == 200
        assert client.get("/models", headers=bearer("# the team's keys")).status_code == 401
    with pytest.raises(ValueError, match="cannot read the key file"):
        Settings(api_keys_file=tmp_path / "missing.txt")


ADMIN_ONLY = [
    ("POST", "/models", {"json": {"name": "copy", "source": "demo:tiny"}}),
    ("DELETE", "/models/demo", {}),
    ("POST", "/models/reload", {}),
    ("POST", "/loras", {"json": {"name": "style"}}),
    ("DELETE", "/loras/style", {}),
    ("POST", "/load-lora/", {"data": {"lora_path": "style"}}),
    ("POST", "/load-controlnet/", {"data": {"controlnet_path": "demo-controlnet"}}),
    ("DELETE", "/unload-controlnet/", {"params": {"model_key": "demo-controlnet"}}),
    ("POST", "/train", {"json": {"kind": "lora", "args": {}}}),
    ("GET", "/train", {}),
    ("GET", "/train/some-run/log", {}),
    ("DELETE", "/train/some-run", {}),
]


@pytest.mark.parametrize("method, path, body", ADMIN_ONLY)
def test_routes_that_change_the_server_need_an_admin_key(keyed, method, path, body):
    refused = keyed.request(method, path, headers=bearer(USER_KEY), **body)
    assert refused.status_code == 403, refused.text
    assert "admin key" in refused.json()["detail"]
    allowed = keyed.request(method, path, headers=bearer(ADMIN_KEY), **body)
    assert allowed.status_code not in (401, 403), allowed.text


def test_every_state_changing_route_is_admin_only_unless_listed(keyed):
    """A route added later is admin-only until it is listed as one every key may use."""
    present = set(routes(keyed))
    assert present >= USER_WRITES, sorted(USER_WRITES - present)  # no stale entries
    for method, path in present:
        if method in ("GET", "HEAD"):
            assert needs_admin(method, path) == path.startswith(("/train", "/datasets")), path
        else:
            assert needs_admin(method, path) == ((method, path) not in USER_WRITES), (method, path)


def test_jobs_can_be_cancelled_only_by_their_key_or_an_admin(tmp_path):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    with TestClient(create_app(keyed_settings(tmp_path), engine=engine)) as client:
        job = client.post("/jobs", json={**GOOD, "task": "text2img"}, headers=bearer(USER_KEY)).json()
        other = client.delete(f"/jobs/{job['id']}", headers=bearer(OTHER_KEY))
        assert other.status_code == 403 and "another key" in other.json()["detail"]
        assert client.get(f"/jobs/{job['id']}", headers=bearer(OTHER_KEY)).json()["status"] == "running"
        own = client.delete(f"/jobs/{job['id']}", headers=bearer(USER_KEY))
        assert own.status_code in (200, 202) and own.json()["cancel_requested"]
        second = client.post("/jobs", json={**GOOD, "task": "text2img"}, headers=bearer(USER_KEY)).json()
        assert client.delete(f"/jobs/{second['id']}", headers=bearer(ADMIN_KEY)).status_code in (200, 202)
        gate.set()


def test_a1111_interrupt_and_skip_reach_only_the_callers_own_job(tmp_path):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    with TestClient(create_app(keyed_settings(tmp_path), engine=engine)) as client, \
            ThreadPoolExecutor(1) as pool:
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
        waiting = pool.submit(client.post, "/sdapi/v1/txt2img", json=body, headers=bearer(USER_KEY))
        wait_for(lambda: engine.submitted, timeout_s=30)
        for route in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            refused = client.post(route, headers=bearer(OTHER_KEY))
            assert refused.status_code == 403 and "another key" in refused.json()["detail"]
        assert client.post("/sdapi/v1/interrupt", headers=bearer(USER_KEY)).json()["interrupted"]
        gate.set()
        assert waiting.result(timeout=30).status_code == 200


# -- cross-site requests, CORS and Host --------------------------------------------------------------------------
@pytest.fixture
def open_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(registry_path=tmp_path / "registry.yaml", data_dir=tmp_path / "data", device="cpu",
                        allowed_origins="https://studio.example.com")
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        yield client


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/load-lora/", {"data": {"lora_path": "/x/evil.safetensors", "lora_scale": "10"}}),
    ("POST", "/models/reload", {}),
    ("POST", "/sdapi/v1/interrupt", {}),
    ("POST", "/submit", {"data": {"text_prompt": "x", "manual_seed": "1"}}),
    ("POST", "/text2img", {"json": GOOD}),
    ("DELETE", "/models/demo", {}),
])
def test_cross_site_requests_that_change_something_are_refused(open_client, method, path, body):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        response = open_client.request(method, path, headers=headers, **body)
        assert response.status_code == 403, (headers, response.text)
        assert "cross-site request refused" in response.json()["detail"]


def test_same_origin_and_allowed_origins_and_programs_may_post(open_client):
    for headers in ({}, {"Origin": "http://testserver"}, {"Sec-Fetch-Site": "same-origin"},
                    {"Origin": "https://studio.example.com"}):
        assert open_client.post("/text2img", json=GOOD, headers=headers).status_code == 200, headers
    # Reads from anywhere are not refused (the browser keeps their answers from a foreign page without CORS).
    assert open_client.get("/models", headers={"Origin": "http://evil.example"}).status_code == 200


def test_cors_answers_only_configured_origins(open_client, tmp_path):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = open_client.options("/text2img", headers={"Origin": "https://studio.example.com", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://studio.example.com"
    other = open_client.options("/text2img", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # Off unless configured.
    settings = Settings(registry_path=tmp_path / "r2.yaml", data_dir=tmp_path / "d2")
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        answer = client.get("/models", headers={"Origin": "https://studio.example.com"})
        assert "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("host, allowed", [
    ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("10.1.2.3", True),
    ("sdserve:8000", True), ("app.localhost", True),
    ("evil.example", False), ("evil.example:8000", False), ("attacker.example.com", False),
])
def test_host_header_default_refuses_dns_rebinding(open_client, host, allowed):
    response = open_client.get("/models", headers={"Host": host})
    assert (response.status_code == 200) == allowed, response.text
    if not allowed:
        assert response.status_code == 400 and "SDSERVE_ALLOWED_HOSTS" in response.json()["detail"]


def test_configured_hosts(tmp_path):
    settings = Settings(registry_path=tmp_path / "r.yaml", data_dir=tmp_path / "d",
                        allowed_hosts="sd.example.com,*.internal.example")
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        assert client.get("/models", headers={"Host": "sd.example.com"}).status_code == 200
        assert client.get("/models", headers={"Host": "gpu1.internal.example:8000"}).status_code == 200
        assert client.get("/models", headers={"Host": "localhost"}).status_code == 400


# -- what is published, what is logged --------------------------------------------------------------------------
def test_openapi_declares_the_key_schemes_only_when_keys_are_set(keyed, open_client):
    schema = keyed.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey", "basic"}
    assert schema["paths"]["/text2img"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}, {"basic": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


def test_keys_never_show_in_settings_or_logs(tmp_path, caplog):
    settings = keyed_settings(tmp_path)
    assert USER_KEY not in repr(settings) and ADMIN_KEY not in str(settings.model_dump())
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings, engine=FakeEngine())) as client:
        client.get("/models", headers=bearer(USER_KEY))
        client.get("/models", headers=bearer("wrong-key"))
    assert USER_KEY not in caplog.text and "wrong-key" not in caplog.text


@pytest.mark.parametrize("host, keys, warned", [
    ("0.0.0.0", "", True), ("192.168.1.20", "", True), ("127.0.0.1", "", False), ("localhost", "", False),
    (None, "", False), ("0.0.0.0", USER_KEY, False),
])
def test_start_up_warns_about_an_open_server(tmp_path, caplog, host, keys, warned):
    settings = Settings(registry_path=tmp_path / "r.yaml", data_dir=tmp_path / "d", host=host, api_keys=keys,
                        admin_keys=ADMIN_KEY if keys else "")
    with caplog.at_level(logging.WARNING, logger="api.security"), \
            TestClient(create_app(settings, engine=FakeEngine())):
        pass
    assert ("without API keys" in caplog.text) == warned, caplog.text


def test_run_api_listens_on_loopback_unless_host_says_otherwise():
    script = (ROOT / "run_api.sh").read_text()
    assert 'export HOST="${HOST:-127.0.0.1}"' in script and '--host "$HOST"' in script
    assert "HOST=0.0.0.0" in (ROOT / "Dockerfile").read_text()


def test_the_schema_tells_the_truth_about_errors(open_client):
    """Before: every 422 was published with `detail` as an array (it is a string), and most statuses were
    undeclared, which broke clients generated from /openapi.json."""
    schema = open_client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert components["ValidationErrorBody"]["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in components
    operations = [(path, method, operation) for path, methods in schema["paths"].items()
                  for method, operation in methods.items()]
    assert len(operations) > 40
    for path, method, operation in operations:
        declared = operation["responses"]
        invalid = "400" if path.startswith("/v1/") else "422"  # OpenAI's clients get 400 for invalid input
        for status in ("401", "403", "413", invalid, "429", "500"):
            assert status in declared, (method, path, status)
            content = declared[status].get("content", {})
            assert list(content) == ["application/json"], (method, path, status, content)
    assert components["OpenAIErrorBody"]["properties"]["error"]
    response = open_client.post("/text2img", json={"prompt": ""})
    assert isinstance(response.json()["detail"], str) and response.json()["errors"][0]["loc"] == ["body", "prompt"]
