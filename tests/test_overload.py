"""A real server process under a bounded burst on loopback, and a streamed body over the limit (issue 10, point 2).

64 clients x 4 requests against a queue of 8: every answer is a 200 (or 202 for jobs) or a 429 with
Retry-After, every accepted job finishes, and the server's memory stays bounded. All traffic goes to 127.0.0.1;
the loops are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import ServerProcess, server_env
from tests.utils import wait_for

logger = logging.getLogger(__name__)

CLIENTS, REQUESTS_EACH, QUEUE = 64, 4, 8
BODY_LIMIT = 1 * 2**20
SMALL = {"prompt": "a burst", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def burst_server(tmp_path_factory: pytest.TempPathFactory, model_cache) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("burst")
    env = server_env(folder, model_cache, SDSERVE_QUEUE_SIZE=str(QUEUE), SDSERVE_MAX_BODY_BYTES=str(BODY_LIMIT),
                     SDSERVE_SAVE_IMAGES="false", SDSERVE_RESULT_CACHE_SIZE="0", OMP_NUM_THREADS="1")
    server = ServerProcess(env, folder / "server.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def rss(server: ServerProcess) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


@pytest.mark.slow
def test_a_burst_gets_only_answers_or_429s_and_every_accepted_job_finishes(burst_server):
    url = burst_server.url
    httpx.post(f"{url}/text2img", json=SMALL, timeout=60).raise_for_status()  # warm: pipelines derived, caches set
    before = rss(burst_server)

    async def client(number: int, http: httpx.AsyncClient) -> list[tuple[str, int, str | None]]:
        answers = []
        for index in range(REQUESTS_EACH):
            body = {**SMALL, "seed": number * 10 + index}
            if (number + index) % 2:
                response = await http.post("/jobs", json={"task": "text2img", **body})
                job = response.json().get("id") if response.status_code == 202 else None
                answers.append(("jobs", response.status_code, job))
            else:
                response = await http.post("/text2img", json=body)
                answers.append(("text2img", response.status_code, None))
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
        return answers

    async def burst() -> list[tuple[str, int, str | None]]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            results = await asyncio.gather(*(client(number, http) for number in range(CLIENTS)))
        return [answer for answers in results for answer in answers]

    started = time.monotonic()
    answers = asyncio.run(burst())
    seconds = time.monotonic() - started
    statuses = Counter((route, status) for route, status, _ in answers)
    assert len(answers) == CLIENTS * REQUESTS_EACH
    assert set(statuses) <= {("text2img", 200), ("text2img", 429), ("jobs", 202), ("jobs", 429)}, statuses
    assert statuses[("text2img", 429)] + statuses[("jobs", 429)] > 0, statuses  # the queue did fill
    assert statuses[("text2img", 200)] > 0 and statuses[("jobs", 202)] > 0, statuses

    accepted = [job for route, status, job in answers if route == "jobs" and status == 202]

    def all_finished() -> bool:
        return all(httpx.get(f"{url}/jobs/{job}", timeout=30).json()["status"] == "succeeded" for job in accepted)

    wait_for(all_finished, timeout_s=120, interval_s=0.5)
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    grown = (rss(burst_server) - before) / 2**20
    logger.info("burst: %d requests in %.1fs, %s, RSS grew %.0f MiB", len(answers), seconds, dict(statuses), grown)
    assert grown < 300, f"RSS grew {grown:.0f} MiB"


def test_a_streamed_body_over_the_limit_is_refused_before_it_is_read_whole(burst_server):
    """Chunked, with no Content-Length: the 413 arrives while the client is still sending."""
    host, port = "127.0.0.1", burst_server.port
    sent = 0
    chunk = b"x" * 65536
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(f"POST /text2img HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < 64 * BODY_LIMIT:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                sock.setblocking(False)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server answered
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        sock.settimeout(10)
        answer = b""
        while b"SDSERVE_MAX_BODY_BYTES" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"SDSERVE_MAX_BODY_BYTES" in answer
    # Socket buffers on both ends hold a few MiB that the server never reads; the whole 64 MiB never went out.
    assert sent < 16 * BODY_LIMIT, sent
    assert httpx.get(f"{burst_server.url}/health", timeout=10).status_code == 200


def test_a_declared_length_over_the_limit_is_refused_at_once(burst_server):
    response = httpx.post(f"{burst_server.url}/text2img", content=b"{" + b" " * (BODY_LIMIT + 10) + b"}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.headers["x-request-id"]
    assert "SDSERVE_MAX_BODY_BYTES" in response.json()["detail"]
