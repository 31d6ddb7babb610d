"""Data flows one way through the package: a module imports only from stages to its left.

data <- detector <- search <- verify <- audit <- report, screen, label; metrics and
generative may use the stages before the audit; demo, study and text2image anything but
the CLI; the CLI is a thin layer over the public API. Private helpers (``medmem._*``) are
usable by all and import no stage. A stage whose name is also a public function lives in
a private module (``medmem/_audit.py`` holds the ``audit`` stage; ``medmem.audit`` is the function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "medmem"
STAGES = [
    "data",
    "detector",
    "search",
    "verify",
    "audit",
    "metrics",
    "report",
    "screen",
    "label",
    "generative",
    "demo",
    "study",
    "text2image",
    "cli",
]
ALLOWED: dict[str, set[str]] = {
    "data": set(),
    "detector": {"data"},
    "search": set(),
    "verify": {"search"},
    "audit": {"data", "detector", "search", "verify"},
    "metrics": {"data", "detector", "search", "verify"},
    "report": {"data", "detector", "search", "verify", "audit", "metrics"},
    "screen": {"data", "detector", "search", "verify", "audit"},
    "label": {"data", "detector", "search", "verify", "audit"},
    "generative": {"data", "detector", "search", "verify", "audit", "metrics"},
    "demo": set(STAGES) - {"demo", "cli"},
    "study": set(STAGES) - {"study", "cli"},
    "text2image": set(STAGES) - {"text2image", "cli"},
    "cli": set(STAGES) - {"cli"},
}
# Private modules that hold a stage, because a public function has the stage's name.
STAGE_MODULES = {"_audit": "audit"}
# The audit's save() writes report.html through a function-level import of medmem.report:
# the one exception, so that `result.save(dir)` gives the whole output folder.
EXCEPTIONS = {("audit", "report")}


def _stage_of(path: Path) -> str | None:
    rel = path.relative_to(SRC).parts
    if rel == ("__init__.py",):
        return None  # the package re-exports the public API
    name = rel[0].removesuffix(".py")
    name = STAGE_MODULES.get(name, name)
    if name.startswith("_"):
        return "_private"
    return name if name in STAGES else None


def _imported_stages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "medmem" and len(parts) > 1:
                stage = STAGE_MODULES.get(parts[1], parts[1])
                if stage in STAGES:
                    found.add(stage)
    return found


FILES = sorted(p for p in SRC.rglob("*.py") if _stage_of(p) is not None)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path: Path) -> None:
    stage = _stage_of(path)
    used = _imported_stages(path) - {stage}
    allowed = set() if stage == "_private" else ALLOWED[stage]
    bad = {u for u in used if u not in allowed and (stage, u) not in EXCEPTIONS}
    assert not bad, f"{path.relative_to(SRC)} ({stage}) imports {sorted(bad)}"


def test_package_modules_are_known() -> None:
    top = {
        p.name.removesuffix(".py")
        for p in SRC.iterdir()
        if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir())
    }
    assert top <= set(STAGES), f"unknown stage(s): {sorted(top - set(STAGES))}"


def test_stage_modules_exist() -> None:
    for module in STAGE_MODULES:
        assert (SRC / f"{module}.py").is_file() or (SRC / module).is_dir(), module


def test_no_public_module_shares_a_name_with_a_public_function() -> None:
    """``import medmem.x as m`` gives a module and ``medmem.x`` is that module, or there is
    no module ``medmem.x`` at all (scikit-learn's manners)."""
    import importlib
    import types

    import medmem

    modules = {
        p.name.removesuffix(".py")
        for p in SRC.iterdir()
        if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir())
    }
    for name in sorted(modules):
        module = importlib.import_module(f"medmem.{name}")
        assert isinstance(module, types.ModuleType)
        if hasattr(medmem, name):
            assert getattr(medmem, name) is module, f"medmem.{name} is not the module"
    for name in medmem.__all__:
        obj = getattr(medmem, name)
        if not isinstance(obj, types.ModuleType):
            assert name not in modules, f"medmem.{name} shadows the module medmem/{name}"
