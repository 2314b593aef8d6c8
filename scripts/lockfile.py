"""What the lock files say, and whether an environment or pyproject.toml agrees with them.

Used by scripts/setup_env.sh after installing a lock (to remove what the lock no longer has) and by
tests/test_lock.py (a dependency added to pyproject.toml without re-locking fails the suite).

    python scripts/lockfile.py strays requirements-dev.lock     # installed packages the lock does not list
    python scripts/lockfile.py check requirements-dev.lock      # exit 1 unless installed == locked
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Installed beside the lock on purpose: the torch pin (requirements-torch.txt), the project itself, the installer.
NOT_LOCKED = {"torch", "sdserve", "pip"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked_versions(lock: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a pip-compile lock."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def torch_pin() -> str:
    for line in (ROOT / "requirements-torch.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            return str(Requirement(line).specifier).removeprefix("==")
    raise ValueError("requirements-torch.txt has no torch requirement")


def installed_versions() -> dict[str, str]:
    """Distributions installed in this environment's site-packages. Not all of sys.path: importing Ray puts its
    vendored copies (ray/thirdparty_files: colorama, psutil) on it, and they are part of the ray wheel."""
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonicalize_name(dist.metadata["Name"]): dist.version
            for dist in metadata.distributions(path=site_packages)}


def strays(lock: Path) -> list[str]:
    """Installed distributions that neither the lock nor NOT_LOCKED accounts for."""
    locked = locked_versions(lock)
    return sorted(name for name in installed_versions() if name not in locked and name not in NOT_LOCKED)


def mismatches(lock: Path) -> list[str]:
    """Every way the running environment differs from the lock (and the torch pin)."""
    installed = installed_versions()
    problems = [
        f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
        for name, version in locked_versions(lock).items()
        if installed.get(name) != version
    ]
    torch_version = installed.get("torch")
    if torch_version is None or Version(torch_version).base_version != torch_pin():
        problems.append(f"torch: pinned {torch_pin()}, installed {torch_version or 'nothing'}")
    return problems + [f"{name}: installed but not locked" for name in strays(lock)]


def project_requirements(pyproject: Path, extras: tuple[str, ...]) -> list[Requirement]:
    """The dependencies of pyproject.toml plus `extras`, those whose markers hold on this interpreter."""
    import tomllib  # Python 3.11+: the tests and the lock tooling run there

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [req for req in requirements if req.marker is None or req.marker.evaluate()]


def disagreements(pyproject: Path, lock: Path, extras: tuple[str, ...]) -> list[str]:
    """Requirements of pyproject.toml that the lock leaves out or pins outside their range."""
    locked = locked_versions(lock)
    problems = []
    for requirement in project_requirements(pyproject, extras):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            if not requirement.specifier.contains(torch_pin(), prereleases=True):
                problems.append(f"torch: pyproject wants {requirement.specifier}, requirements-torch.txt pins "
                                f"{torch_pin()}")
            continue
        if name not in locked:
            problems.append(f"{requirement}: in pyproject.toml but not in {lock.name}")
        elif not requirement.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{requirement}: {lock.name} pins {locked[name]}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("strays", "check"):
        sys.stderr.write(__doc__ or "")
        return 2
    lock = Path(argv[1])
    if argv[0] == "strays":
        sys.stdout.write("".join(f"{name}\n" for name in strays(lock)))
        return 0
    problems = mismatches(lock)
    sys.stdout.write("".join(f"{problem}\n" for problem in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
