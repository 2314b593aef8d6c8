"""The walls between the packages, read from the code's own imports: api/ talks to the engine only through its
interface, models/ knows nothing of HTTP or training, and no module imports itself round a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("api", "models", "training")
# What api/ may import from models/: the interface, the plain types that cross it, and shared vocabulary.
API_MAY_IMPORT = (
    "models.interface", "models.types", "models.settings", "models.errors", "models.registry",
    "models.sources", "models.logcontext",
)
APP_FACTORY_MAY_IMPORT = ("models.engines",)  # the composition root picks the implementation


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules a file imports at run time (imports under `if TYPE_CHECKING:` are only for the type checker)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return found


def sources(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def test_api_imports_only_the_engine_interface_and_its_types():
    offences = []
    for name, path in sources("api").items():
        allowed = API_MAY_IMPORT + (APP_FACTORY_MAY_IMPORT if name == "api.app" else ())
        for imported in imports(path):
            if imported.startswith("models.") and not imported.startswith(allowed):
                offences.append(f"{name} imports {imported}")
            if imported.split(".")[0] in ("torch", "diffusers", "transformers", "peft"):
                offences.append(f"{name} imports {imported}")
    assert offences == []


def test_models_knows_nothing_of_http_or_training():
    offences = [
        f"{name} imports {imported}"
        for name, path in sources("models").items()
        for imported in imports(path)
        if imported.split(".")[0] in ("fastapi", "starlette", "api", "training")
    ]
    assert offences == []


def test_no_module_imports_itself_round_a_circle():
    modules = {name: path for package in PACKAGES for name, path in sources(package).items()}
    graph = {
        name: {target for imported in imports(path) for target in _known(imported, modules) if target != name}
        for name, path in modules.items()
    }
    circles = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [node, target]) if target in trail
                               else f"{node} -> {target}")
            elif target not in state:
                visit(target, [*trail, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert circles == []


def _known(imported: str, modules: dict[str, Path]) -> set[str]:
    """The project modules an import statement loads: the module named, or the package of a name imported."""
    while imported:
        if imported in modules:
            return {imported}
        imported = imported.rpartition(".")[0]
    return set()


def test_ray_stays_inside_models_cluster():
    """The `ray` extra is optional: only models/cluster/ imports Ray, and nothing imports models/cluster/, so the
    single-process server (./run_api.sh) runs without it (tests/test_cluster_unit.py checks it at run time too)."""
    offences = [
        f"{name} imports {imported}"
        for package in PACKAGES
        for name, path in sources(package).items()
        if not name.startswith("models.cluster")
        for imported in imports(path)
        if imported.split(".")[0] == "ray" or imported.startswith("models.cluster")
    ]
    assert offences == []
