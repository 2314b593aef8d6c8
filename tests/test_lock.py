"""The locks: what CI tested is what a fresh machine installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.lockfile import disagreements, locked_versions, mismatches, torch_pin
from tests.conftest import ROOT

PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==")
# The dev lock also holds the optional extras the tests exercise (Ray Serve, the PostgreSQL driver).
LOCKS = {
    "requirements.lock": ("gpu", "openvino"),
    "requirements-dev.lock": ("gpu", "openvino", "dev", "ray", "postgres"),
    "requirements-ray.lock": ("gpu", "openvino", "ray", "postgres"),
}


@pytest.mark.parametrize("lock, extras", LOCKS.items())
def test_pyproject_and_lock_agree(lock: str, extras: tuple[str, ...]):
    """A dependency added to pyproject.toml (or a range moved) without re-locking fails here."""
    assert disagreements(ROOT / "pyproject.toml", ROOT / lock, extras) == [], "run scripts/relock.sh"


def test_every_pin_carries_hashes():
    for lock in LOCKS:
        lines = (ROOT / lock).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if PIN.match(line):
                assert "--hash=sha256:" in lines[number + 1], f"{lock} line {number + 1}: {line} has no hash"


def test_both_locks_pin_shared_packages_alike():
    runtime, dev = locked_versions(ROOT / "requirements.lock"), locked_versions(ROOT / "requirements-dev.lock")
    assert set(runtime) <= set(dev)
    assert {name: dev[name] for name in runtime} == runtime


def test_the_ray_lock_is_the_server_lock_plus_the_extras_as_tested():
    """requirements-ray.lock (a Ray Serve image) holds every server pin, and pins everything as the dev lock does."""
    runtime, dev = locked_versions(ROOT / "requirements.lock"), locked_versions(ROOT / "requirements-dev.lock")
    scaled = locked_versions(ROOT / "requirements-ray.lock")
    assert {name: scaled.get(name) for name in runtime} == runtime
    assert {name: dev.get(name) for name in scaled} == scaled
    assert {"ray", "psycopg"} <= set(scaled)


def test_the_environment_is_exactly_the_dev_lock():
    """run_tests.sh installed requirements-dev.lock and the torch pin, and nothing else."""
    assert mismatches(ROOT / "requirements-dev.lock") == []


def test_known_bad_combination_is_excluded(tmp_path: Path):
    """transformers 5.24 needs peft>=0.22, which does not exist: pyproject.toml must not allow it."""
    lock = tmp_path / "bad.lock"
    pins = locked_versions(ROOT / "requirements.lock") | {"transformers": "5.24.0"}
    lock.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()), encoding="utf-8")
    problems = disagreements(ROOT / "pyproject.toml", lock, LOCKS["requirements.lock"])
    assert any(problem.startswith("transformers") for problem in problems), problems


def test_torch_pin_is_a_release():
    assert torch_pin().count(".") == 2
