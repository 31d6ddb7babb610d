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
    "verify": {"detector", "search"},
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
STAGE_MODULES = {"_audit": "audit", "_identity": "audit"}
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


def test_every_warning_is_a_medmem_warning() -> None:
    """``warnings.warn`` in medmem passes ``category=MedmemWarning``, so that pytest's
    ``error::medmem.MedmemWarning`` (pyproject) fails a test that does not assert it and users
    can filter medmem's warnings apart from their libraries'."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "warn"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "warnings"
            ):
                continue
            category = next((k.value for k in node.keywords if k.arg == "category"), None)
            if len(node.args) > 1:
                category = node.args[1]
            if not (isinstance(category, ast.Name) and category.id == "MedmemWarning"):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not bad, f"warnings.warn without category=MedmemWarning: {bad}"


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


# ---------------------------------------------------------------- benchmarks/, experiments/
ROOT = SRC.parents[1]
SCRIPTS = sorted(
    p for folder in ("benchmarks", "experiments") for p in (ROOT / folder).glob("*.py")
)
# Still to change by their owner (their sibling imports, as ``from benchmarks._common
# import ...``, run as ``python -m benchmarks.<name>``); remove each name once done.
PENDING_SYS_PATH: set[str] = set()


def _private_medmem_uses(tree: ast.AST) -> list[str]:
    """Private medmem modules or names a script imports or reaches (``medmem._x``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "medmem":
                found += [node.module] if any(p.startswith("_") for p in parts) else []
                found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "medmem" and any(p.startswith("_") for p in parts):
                    found.append(a.name)
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "medmem":
                found.append(ast.unparse(node))
    return found


def _path_edits(tree: ast.AST) -> list[str]:
    """``sys.path`` changes, and bare sibling imports (``from _common import``) needing them."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node).startswith("sys.path."):
            found.append(ast.unparse(node))
        sibling = isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        if sibling and node.module.startswith("_") and node.module != "__future__":
            found.append(f"from {node.module} import")
    return found


def test_scripts_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert "experiments/text2image_study.py" in names and "benchmarks/search.py" in names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_use_public_names_only(path: Path) -> None:
    """benchmarks/ and experiments/ use medmem as a user would: no ``medmem._*``."""
    bad = _private_medmem_uses(ast.parse(path.read_text(encoding="utf-8")))
    assert not bad, f"{path.relative_to(ROOT)} uses private medmem names: {bad}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_do_not_edit_sys_path(path: Path) -> None:
    """Helpers come in as ``from benchmarks._common import ...`` (``python -m``)."""
    edits = _path_edits(ast.parse(path.read_text(encoding="utf-8")))
    if path.relative_to(ROOT).as_posix() in PENDING_SYS_PATH:
        assert edits, f"{path.relative_to(ROOT)} is clean now: drop it from PENDING_SYS_PATH"
        pytest.skip("sys.path edit still pending in this file")
    assert not edits, f"{path.relative_to(ROOT)} edits sys.path or imports a sibling: {edits}"


def test_the_private_name_check_catches_each_form() -> None:
    code = (
        "import medmem._io\nfrom medmem._stats import auroc\nfrom medmem.text2image import _x\n"
        "import medmem\nmedmem._plots.save_figure\nfrom medmem.metrics import auroc\n"
    )
    assert sorted(_private_medmem_uses(ast.parse(code))) == [
        "medmem._io",
        "medmem._plots",
        "medmem._stats",
        "medmem.text2image._x",
    ]
    assert _path_edits(ast.parse("import sys\nsys.path.insert(0, 'x')\nfrom _common import a\n"))
    assert not _path_edits(ast.parse("from __future__ import annotations\n"))


def test_the_text_to_image_study_driver_imports_and_explains_itself(capsys) -> None:
    """experiments/text2image_study.py loads with the public API (not run: hours on a CPU)."""
    import importlib.util

    path = ROOT / "experiments" / "text2image_study.py"
    spec = importlib.util.spec_from_file_location("text2image_study", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--stages" in capsys.readouterr().out
    assert {"mitigations", "fix_eval", "report"} <= set(module.STAGES)
