"""The house's import rules, checked in fresh interpreters (other tests import torch and SimPy themselves).

- The simulator never imports torch: planning stays fast and installs without a GPU stack.
- The plan contract (``simulator.contracts``) loads neither SimPy nor the engine nor the planning room:
  the runtime and the launcher read a plan file without the simulator.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import moeplan.simulator


def _modules_loaded_by(imports: list[str], tmp_path) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print('\\n'.join(sorted(sys.modules)))"
    # -P and a neutral cwd: the repository root must not shadow the installed package
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def _simulator_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(moeplan.simulator.__path__, "moeplan.simulator."))


def test_every_simulator_module_is_found() -> None:
    names = _simulator_modules()
    assert "moeplan.simulator.contracts.plan_file" in names and "moeplan.simulator.engine.step" in names


def test_simulator_does_not_import_torch(tmp_path) -> None:
    loaded = _modules_loaded_by(_simulator_modules(), tmp_path)
    assert "moeplan.simulator.engine.step" in loaded  # the import above really ran
    assert "torch" not in loaded


@pytest.mark.parametrize("module", ["moeplan.simulator.contracts.plan_file", "moeplan.simulator.contracts.expert_load",
                                    "moeplan.simulator.contracts.trace"])
def test_contracts_load_without_the_engine(module: str, tmp_path) -> None:
    loaded = _modules_loaded_by([module], tmp_path)
    assert module in loaded
    forbidden = sorted(m for m in loaded if m == "simpy" or m.startswith(("simpy.", "torch",
                       "moeplan.simulator.engine", "moeplan.simulator.planning", "moeplan.simulator.costs",
                       "moeplan.simulator.report", "plotly")))
    assert forbidden == []
