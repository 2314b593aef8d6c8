"""The project's own files: Dockerfile lint, scripts, settings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.settings import Settings
from tests.conftest import ROOT


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_and_valid_bash():
    for script in ("run_api.sh", "run_tests.sh", ".ci/run", "scripts/relock.sh"):
        path = ROOT / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("SDSERVE_MAX_WIDTH", "1024")
    monkeypatch.setenv("SDSERVE_DEVICE", "cpu")
    settings = Settings()
    assert settings.max_width == 1024 and settings.device == "cpu"
    monkeypatch.setenv("SDSERVE_MAX_WIDTH", "1001")
    with pytest.raises(ValidationError, match="multiple of 8"):
        Settings()
