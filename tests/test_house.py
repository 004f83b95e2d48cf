"""The house's layout, checked on the source: which room may import which, third-party rules, one
docstring per room saying what it holds and may import, and pyproject's package list.

Rooms are ``moeplan.<folder>`` and, inside the simulator, ``moeplan.simulator.<subpackage>``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("simulator", "model", "kernels", "orchestrator", "manifests")
SIM_ORDER = ("spec", "presets", "schedules", "accounting", "placement", "traffic", "contracts", "costs", "engine",
             "planning", "report")
# simulator rooms: the ones each may import (docs/design/architecture.md draws this graph)
SIM_ALLOWED = {
    "spec": set(),
    "presets": {"spec"},
    "schedules": {"spec"},
    "accounting": {"spec", "schedules"},
    "placement": {"spec"},
    "traffic": {"spec", "placement"},
    "contracts": {"spec", "schedules", "accounting", "placement"},
    "costs": {"spec", "presets"},
    "engine": {"spec", "schedules", "accounting", "placement", "traffic", "contracts", "costs"},
    "planning": {"spec", "presets", "schedules", "accounting", "placement", "traffic", "contracts", "costs", "engine"},
    "report": set(SIM_ORDER) - {"report"},
}
ALLOWED = {f"simulator.{room}": {f"simulator.{r}" for r in rooms} for room, rooms in SIM_ALLOWED.items()}
ALLOWED |= {
    "simulator": set(),
    "kernels": set(),
    "model": {"kernels", "simulator.spec", "simulator.contracts", "simulator.schedules"},
    "manifests": {"simulator.spec", "simulator.contracts"},
    "orchestrator": {"kernels", "model", "manifests", "simulator"} | {f"simulator.{r}" for r in SIM_ORDER},
}
# third-party packages a room must never load
FORBIDDEN = {"simulator": ("torch", "triton", "ray", "kubernetes"), "kernels": ("simpy", "plotly"),
             "model": ("simpy", "plotly")}


def _room(module: str) -> str:
    parts = module.split(".")  # moeplan.<folder>[.<room>...]
    if parts[1] == "simulator" and len(parts) > 2:
        return f"simulator.{parts[2]}"
    return parts[1]


def _modules(root: Path) -> list[tuple[str, Path]]:
    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append(("moeplan." + ".".join(parts), path))
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            else:
                found.append((node.lineno, node.module))
    return found


def _violations(root: Path = ROOT) -> list[str]:
    bad = []
    for module, path in _modules(root):
        room = _room(module)
        for line, name in _imports(path, module):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if name.startswith("moeplan."):
                target = _room(name)
                if target != room and target not in ALLOWED[room]:
                    bad.append(f"{where} (room {room} may import {sorted(ALLOWED[room])})")
            else:
                top = room.split(".")[0]
                if name.split(".")[0] in FORBIDDEN.get(top, ()):
                    bad.append(f"{where} (room {room} must not load {name.split('.')[0]})")
                if name.split(".")[0] == "simpy" and room != "simulator.engine":
                    bad.append(f"{where} (only the engine runs SimPy)")
    return bad


def test_rooms_import_only_what_they_may() -> None:
    assert _violations() == []


def test_the_check_sees_violations(tmp_path) -> None:
    assert _room("moeplan.simulator.contracts.plan_file") == "simulator.contracts"
    assert _room("moeplan.model.fp8") == "model"
    spec = tmp_path / "simulator" / "spec"
    spec.mkdir(parents=True)
    (spec / "bad.py").write_text("import torch\nfrom moeplan.simulator.planning.planner import plan\nimport simpy\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "ok.py").write_text("from .fp8_quant import quant_act_1x128\n")
    (tmp_path / "kernels" / "bad.py").write_text("from moeplan.model.fp8 import FP8_MAX\n")
    found = _violations(tmp_path)
    assert len(found) == 4 and all("bad.py" in v for v in found), found


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_room_says_what_it_holds_and_may_import(folder: str) -> None:
    for init in sorted((ROOT / folder).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc or "Imports nothing" in doc, f"{init.relative_to(ROOT)}: docstring {doc[:60]!r}"


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"moeplan." + ".".join(init.parent.relative_to(ROOT).parts)
             for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert listed == found
    assert config["package-dir"] == {f"moeplan.{folder}": folder for folder in FOLDERS}
