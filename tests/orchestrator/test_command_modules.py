"""The shape of the command modules (``orchestrator/*_cmd.py``), read with ``ast``: a command imports no
other command (what two share lives in a module both use) and never reports an error itself (it raises;
``errors.ReportingGroup`` reports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer

from moeplan.orchestrator import cli
from moeplan.orchestrator.errors import ReportingGroup

ORCHESTRATOR = Path(cli.__file__).parent
COMMANDS = sorted(ORCHESTRATOR.glob("*_cmd.py"))
PACKAGE = "moeplan.orchestrator"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from x import y`` counts ``x`` and ``x.y``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against moeplan.orchestrator
                parent = PACKAGE.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_the_command_modules_are_found():
    assert {p.name for p in COMMANDS} >= {"plan_cmd.py", "schedule_cmd.py", "placement_cmd.py"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_a_command_imports_no_other_command(path):
    commands = {f"{PACKAGE}.{p.stem}" for p in COMMANDS} - {f"{PACKAGE}.{path.stem}"}
    assert not _imported_modules(path) & commands


def test_the_import_reader_sees_every_form(tmp_path):
    src = tmp_path / "x_cmd.py"
    src.write_text("import moeplan.orchestrator.a_cmd\nfrom moeplan.orchestrator import b_cmd\n"
                   "from .c_cmd import run\nfrom . import d_cmd\n")
    assert {f"{PACKAGE}.{m}_cmd" for m in "abcd"} <= _imported_modules(src)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_a_command_raises_and_never_reports_itself(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("Exit", "Abort"), f"{path.name}:{node.lineno}: exits itself"
        if isinstance(node, ast.Name):
            assert node.id != "SystemExit", f"{path.name}:{node.lineno}: exits itself"
        if isinstance(node, ast.keyword):
            assert node.arg != "err", f"{path.name}:{node.lineno}: prints to stderr itself"


def test_every_command_runs_under_the_reporting_group():
    group = typer.main.get_command(cli.app)
    assert isinstance(group, ReportingGroup)
    assert {"plan", "schedule", "placement", "show", "presets", "schema"} <= set(group.commands)
