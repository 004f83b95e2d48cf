"""The model room's own import graph, read from the source (tests/test_house.py checks the rooms).

- No cycle between model modules, imports inside functions included: a cycle "broken" by a local
  import is still a cycle.
- No ``importlib``: the model names what it imports (``kernels`` is a plain dependency).
- Each FP8 concept has one home: ``grouped_mm`` is float math (no FP8, no kernels), ``fp8`` holds the
  quantisation and the GEMMs but no layer, and the autograd lives in ``linear`` / ``grouped_linear``.

A fresh interpreter cannot show this: importing any ``moeplan.model.X`` runs the package's
``__init__``, which builds everything.
"""

from __future__ import annotations

import ast

from tests.test_house import ROOT, _imports, _modules

MODEL_MODULES = {module: path for module, path in _modules(ROOT) if module.startswith("moeplan.model")}


def _direct(module: str) -> set[str]:
    return {name for _, name in _imports(MODEL_MODULES[module], module)}


def _closure(module: str) -> set[str]:
    """Every module ``module`` imports, directly or through other model modules."""
    seen, todo = set(), [module]
    while todo:
        for name in _direct(todo.pop()):
            if name not in seen:
                seen.add(name)
                todo += [name] if name in MODEL_MODULES else []
    return seen


def test_the_model_modules_are_found() -> None:
    assert {"moeplan.model.fp8", "moeplan.model.grouped_mm", "moeplan.model.grouped_linear"} <= set(MODEL_MODULES)


def test_no_import_cycle() -> None:
    # the package __init__ imports its modules; none of them imports the package back
    assert [module for module in sorted(MODEL_MODULES) if module in _closure(module)] == []


def test_no_importlib() -> None:
    for module, path in MODEL_MODULES.items():
        tree = ast.parse(path.read_text())
        names = {name.split(".")[0] for _, name in _imports(path, module)}
        calls = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        calls |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert "importlib" not in names and not {"import_module", "__import__"} & calls, path


def test_each_fp8_concept_has_one_home() -> None:
    float_math = _closure("moeplan.model.grouped_mm")
    assert not any(name.startswith(("moeplan.model", "moeplan.kernels")) for name in float_math), float_math
    fp8 = _closure("moeplan.model.fp8")
    assert "moeplan.model.grouped_mm" in fp8  # intended: the reference FP8 grouped GEMM is grouped_mm's, dequantised
    assert {"moeplan.kernels.fp8_quant", "moeplan.kernels.fp8_gemm"} <= fp8  # the float references are the kernels'
    layers = {"moeplan.model.linear", "moeplan.model.grouped_linear", "moeplan.model.experts"}
    assert not layers & fp8, fp8
    assert "moeplan.model.grouped_linear" in _direct("moeplan.model.experts")
