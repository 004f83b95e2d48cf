"""Safe by construction (issue 23, item 6): moeplan's own code loads plans, runs, configs, manifests and
kubeconfigs as data only. An AST scan of every package folder: no pickle, marshal, shelve or dill; no
``eval``/``exec``; every ``yaml.load``/``load_all`` with the safe loader; every ``torch.load`` with
``weights_only=True``. (torch's distributed checkpoint reads its own metadata file with pickle: moeplan reads it through
``model/runtime/checkpoint_reader.py``, an unpickler that resolves DCP's metadata types only.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("simulator", "model", "kernels", "orchestrator", "manifests")
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "_pickle"}
SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", 'getattr(yaml, "CSafeLoader", yaml.SafeLoader)'}


def _problems(tree: ast.AST) -> list[str]:
    """What in one module's syntax tree is not data-only loading, as ``line: what``."""
    safe_names = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and ast.unparse(node.value).replace("'", '"') in SAFE_LOADERS
                  for t in node.targets if isinstance(t, ast.Name)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            out += [f"{node.lineno}: imports {n}" for n in names if n and n.split(".")[0] in FORBIDDEN_MODULES]
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value).replace("'", '"') for k in node.keywords}
        if called in ("eval", "exec", "builtins.eval", "builtins.exec"):
            out.append(f"{node.lineno}: calls {called}")
        if called in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
            loader = keywords.get("Loader")
            if called.startswith(("yaml.unsafe", "yaml.full")) or not (loader in SAFE_LOADERS or loader in safe_names):
                out.append(f"{node.lineno}: {called} without the safe loader (Loader={loader})")
        if called == "torch.load" and keywords.get("weights_only") != "True":
            out.append(f"{node.lineno}: torch.load without weights_only=True")
    return out


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def test_our_code_loads_data_only():
    found = {str(p.relative_to(ROOT)): problems for p in _modules()
             if (problems := _problems(ast.parse(p.read_text(encoding="utf-8"))))}
    # The one allowed import: the checkpoint reader subclasses pickle.Unpickler to refuse every global but DCP's
    # metadata types (model/runtime/checkpoint_reader.py); it must never call pickle's own loaders.
    reader = "model/runtime/checkpoint_reader.py"
    if reader in found and all(p.endswith("imports pickle") for p in found[reader]):
        del found[reader]
    calls = {ast.unparse(n.func) for n in ast.walk(ast.parse((ROOT / reader).read_text(encoding="utf-8")))
             if isinstance(n, ast.Call)}
    assert not calls & {"pickle.load", "pickle.loads", "pickle.Unpickler"}, calls
    assert not found, found


@pytest.mark.parametrize(("source", "expected"), [
    ("import pickle", "imports pickle"),
    ("from marshal import loads", "imports marshal"),
    ("eval(text)", "calls eval"),
    ("import yaml\nyaml.load(text)", "without the safe loader"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "without the safe loader"),
    ("import yaml\nyaml.full_load(text)", "without the safe loader"),
    ("import torch\ntorch.load(path)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(path, weights_only=False)", "torch.load without weights_only=True"),
])
def test_the_scan_sees_code_loading(source, expected):
    """A test that cannot fail is a defect: each of these is caught (and the safe forms pass below)."""
    assert any(expected in p for p in _problems(ast.parse(source))), _problems(ast.parse(source))


def test_the_safe_forms_pass():
    source = ('import yaml, torch\nloader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)\nyaml.load(t, Loader=loader)\n'
              "yaml.load_all(t, Loader=yaml.SafeLoader)\ntorch.load(p, weights_only=True)\nmodel.eval()\n")
    assert _problems(ast.parse(source)) == []
