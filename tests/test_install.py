"""The installed wheel, not the editable checkout: ``moeplan`` must sit beside Hugging Face's ``kernels``.

Our folder ``kernels/`` used to install as a top-level package and shadowed PyPI's ``kernels``, which
transformers depends on from 5.25 on (``from transformers import DeepseekV3ForCausalLM`` then failed with
``cannot import name 'CUDAProperties' from 'kernels'``). An editable install hides such mistakes (its finder
maps names onto the folders), so this test builds the wheel from the working tree's files, reads its
file list, installs it into a fresh virtual environment beside transformers>=5.25, and runs the model
equivalence test there, from outside the repository, against the installed ``moeplan``.

It needs PyPI for transformers and ``kernels`` and skips, saying so, only when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.version import Version

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# transformers 5.25.0 is the first release that depends on Hugging Face's `kernels` (kernels>=0.19.1,<0.20)
KERNELS_ERA_TRANSFORMERS = Version("5.25")
# what the checks below load besides transformers and pytest: moeplan.model needs torch, its spec pydantic;
# the wheel's other dependencies (ray, kubernetes, SimPy, ...) are not installed, to keep the install cheap
CHECK_DEPENDENCIES = ("torch", "pydantic")
# connection failures in pip's output: only these make the test skip; any other pip failure fails it
NETWORK_ERRORS = ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError",
                  "NameResolutionError")
PROBE_TIMEOUT_S = 90
BUILD_TIMEOUT_S = 120
INSTALL_TIMEOUT_S = 480
CHECK_TIMEOUT_S = 300

# run in the fresh environment: which files the imports resolved to, and what pip installed them from
IMPORTS_PROBE = """
import importlib.metadata as md, json
from transformers import DeepseekV3ForCausalLM
import kernels, moeplan.kernels, moeplan.model
print(json.dumps({
    "kernels": [kernels.__file__, str(md.distribution("kernels").locate_file("kernels/__init__.py"))],
    "moeplan.kernels": [moeplan.kernels.__file__,
                        str(md.distribution("moeplan").locate_file("moeplan/kernels/__init__.py"))],
    "versions": {name: md.version(name) for name in ("transformers", "kernels", "torch")},
}))
"""
# pytest in-process, so the modules the tests really used can be read from sys.modules afterwards
PYTEST_THEN_REPORT = """
import json, sys, pytest
outcomes = {}
class Count:
    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1
code = pytest.main(sys.argv[1:], plugins=[Count()])
used = {name: getattr(sys.modules.get(name), "__file__", None)
        for name in ("moeplan.model", "tests.model.hf_reference")}
print("REPORT " + json.dumps({"exit_code": int(code), "outcomes": outcomes, "files": used}))
"""


def _child_env(pycache_prefix: Path | None) -> dict[str, str]:
    """This environment without what would leak the repository or our venv into a child interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST_", "VIRTUAL_ENV"))}
    env |= {"PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}  # no user site; nothing asks the Hugging Face hub
    # no .pyc litter in tests/; the fresh venv (installed --no-compile) shares compiled modules between its runs
    return env | ({"PYTHONPYCACHEPREFIX": str(pycache_prefix)} if pycache_prefix else {"PYTHONDONTWRITEBYTECODE": "1"})


def _run(args: list, *, timeout_s: float, cwd: Path, pycache_prefix: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [str(a) for a in args]
    start = time.monotonic()
    try:
        result = subprocess.run(args, check=False, cwd=cwd, env=_child_env(pycache_prefix), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} did not finish in {timeout_s} s", pytrace=False)
    log.info("%.1f s: %s", time.monotonic() - start, " ".join(args))
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}", pytrace=False)
    return result


def _working_tree_files(repo: Path) -> list[str]:
    """The working tree's files as a commit of all of it would hold them: tracked ones with their uncommitted
    edits, new ones git does not ignore, and none deleted on disk (a fresh clone, as in CI, holds the same)."""
    listed = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.fail(f"the wheel is built from the files git lists in {repo}: {listed.stderr.strip()}", pytrace=False)
    return [name for name in listed.stdout.split("\0") if name and (repo / name).is_file()]


def _package_dir(repo: Path) -> dict[str, str]:
    """pyproject's mapping of import packages onto folders, e.g. ``{"moeplan.kernels": "kernels"}``."""
    return tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def _wheel_problems(wheel_names: list[str], tracked: list[str], package_dir: dict[str, str]) -> list[str]:
    """What is wrong with a wheel's file list: a top-level name besides ``moeplan``, or a tracked module,
    package or data file of our folders that it lacks (a subpackage left out of pyproject's list)."""
    problems = []
    stray = sorted({name.split("/")[0] for name in wheel_names
                    if not name.startswith("moeplan/") and not re.match(r"moeplan-[^/]+\.dist-info/", name)})
    if stray:
        problems.append(f"top-level names besides moeplan: {stray}")
    shipped = set(wheel_names)
    expected = {}  # wheel path -> tracked path
    for package, folder in package_dir.items():
        prefix = package.replace(".", "/")
        expected |= {prefix + path[len(folder):]: path for path in tracked
                     if path.startswith(folder + "/") and path.endswith((".py", ".json"))}
    missing = sorted(path for path in expected if path not in shipped)
    packages = sorted(path.removesuffix("/__init__.py").replace("/", ".") for path in missing
                      if path.endswith("/__init__.py"))
    if packages:
        problems.append(f"packages missing (pyproject's packages list?): {packages}")
    if missing:
        problems.append(f"files missing: {missing}")
    return problems


def _fresh_constraints(constraints: str) -> tuple[str, str]:
    """constraints.txt for the fresh environment, and the transformers requirement to install: the pinned
    one if it already depends on Hugging Face's kernels, else the pin is dropped for ``transformers>=5.25``."""
    lines = constraints.splitlines()
    assert any(line.startswith("torch==") for line in lines), "constraints.txt must pin torch (else a CUDA build)"
    pin = next((line for line in lines if line.startswith("transformers==")), None)
    if pin is not None and Version(pin.split("==")[1]) >= KERNELS_ERA_TRANSFORMERS:
        return constraints, "transformers"
    kept = [line for line in lines if line != pin]
    return "\n".join(kept) + "\n", f"transformers>={KERNELS_ERA_TRANSFORMERS}"


def _skip_unless_pypi_reachable(scratch: Path) -> None:
    """Skip when pip cannot connect to the registry; any other failure of the probe fails the test."""
    result = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "15",
                   "-d", scratch / "probe", "kernels"], timeout_s=PROBE_TIMEOUT_S, cwd=scratch, check=False)
    if result.returncode == 0:
        return
    reasons = [line for line in result.stdout.splitlines() if any(e in line for e in NETWORK_ERRORS)]
    if reasons:
        pytest.skip(f"PyPI unreachable (pip download kernels): {reasons[0][:300]}")
    pytest.fail(f"pip download kernels failed, not for the network:\n{result.stdout[-4000:]}", pytrace=False)


def _install_fresh_env(venv: Path, wheel: Path, scratch: Path) -> Path:
    """A new venv holding our wheel (not editable), transformers with kernels, pytest and what the checks
    import; returns its python. Our venv's pip installs into it (``--python``): it needs no pip of its own."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout_s=BUILD_TIMEOUT_S, cwd=scratch)
    python = venv / "bin" / "python"
    constraints, transformers = _fresh_constraints((REPO / "constraints.txt").read_text())
    (scratch / "constraints.txt").write_text(constraints)
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-compile", "--no-input"]
    _run([*pip, "-c", scratch / "constraints.txt", transformers, "pytest", *CHECK_DEPENDENCIES],
         timeout_s=INSTALL_TIMEOUT_S, cwd=scratch)
    _run([*pip, "--no-deps", wheel], timeout_s=INSTALL_TIMEOUT_S, cwd=scratch)
    return python


def _run_fresh(python: Path, code: str, *args, scratch: Path, check: bool = True) -> str:
    """``python -P -c code args`` in the fresh environment, from the scratch folder (not the repository)."""
    return _run([python, "-P", "-c", code, *args], timeout_s=CHECK_TIMEOUT_S, cwd=scratch,
                pycache_prefix=scratch / "pycache", check=check).stdout


def _last_json(output: str, prefix: str = "") -> dict:
    """The last line of a child's output that starts with ``prefix`` and holds a JSON object."""
    lines = [line for line in output.splitlines() if line.startswith(prefix + "{")]
    assert lines, f"no {prefix!r}JSON line in:\n{output[-4000:]}"
    return json.loads(lines[-1].removeprefix(prefix))


@dataclass(frozen=True)
class Build:
    """A wheel and the copy of the working tree it was built from (others may edit the tree meanwhile)."""
    source: Path
    files: list[str]  # relative to source
    wheel: Path


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Build:
    """The wheel built, not editable, from a copy of the working tree's files that git tracks or would."""
    source = tmp_path_factory.mktemp("source")
    files = _working_tree_files(REPO)
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-input", "-w", out, source],
         timeout_s=BUILD_TIMEOUT_S, cwd=out)
    (wheel,) = out.glob("moeplan-*.whl")
    return Build(source, files, wheel)


def test_wheel_holds_only_moeplan_and_every_package(build: Build) -> None:
    names = zipfile.ZipFile(build.wheel).namelist()
    assert "moeplan/kernels/__init__.py" in names and "moeplan/simulator/spec/__init__.py" in names
    assert _wheel_problems(names, build.files, _package_dir(build.source)) == []


def test_the_wheel_check_sees_a_stray_top_level_and_a_forgotten_subpackage() -> None:
    tracked = ["kernels/__init__.py", "kernels/op.py", "simulator/__init__.py", "simulator/report/__init__.py",
               "simulator/costs/data/h200.json", "tests/test_x.py"]
    package_dir = {"moeplan.kernels": "kernels", "moeplan.simulator": "simulator"}
    good = ["moeplan/kernels/__init__.py", "moeplan/kernels/op.py", "moeplan/simulator/__init__.py",
            "moeplan/simulator/report/__init__.py", "moeplan/simulator/costs/data/h200.json",
            "moeplan-0.1.0.dist-info/RECORD"]
    assert _wheel_problems(good, tracked, package_dir) == []
    bad = [name for name in good if "report" not in name and "h200" not in name] + ["kernels/__init__.py"]
    problems = _wheel_problems(bad, tracked, package_dir)
    assert problems[0] == "top-level names besides moeplan: ['kernels']"
    assert problems[1] == "packages missing (pyproject's packages list?): ['moeplan.simulator.report']"
    assert "moeplan/simulator/costs/data/h200.json" in problems[2]


def test_fresh_install_sits_beside_hugging_face_kernels(build: Build) -> None:
    with tempfile.TemporaryDirectory(prefix="moeplan-install-") as tmp:  # ~1 GB of venv: not kept by pytest
        scratch = Path(tmp)
        _skip_unless_pypi_reachable(scratch)
        python = _install_fresh_env(scratch / "venv", build.wheel, scratch)
        site = _run_fresh(python, "import sysconfig; print(sysconfig.get_path('purelib'))", scratch=scratch).strip()

        # (a) transformers imports its model beside Hugging Face's kernels, (b) moeplan.kernels is ours, installed
        found = _last_json(_run_fresh(python, IMPORTS_PROBE, scratch=scratch))
        log.info("fresh environment: %s", found["versions"])
        assert Version(found["versions"]["transformers"]) >= KERNELS_ERA_TRANSFORMERS, found["versions"]
        for module in ("kernels", "moeplan.kernels"):
            imported, installed = found[module]
            assert imported == installed and imported.startswith(site), f"{module}: {imported} vs {installed}"
        ours = zipfile.ZipFile(build.wheel).read("moeplan/kernels/__init__.py")  # our kernels/__init__.py, as built
        assert Path(found["moeplan.kernels"][0]).read_bytes() == ours

        # (c) the equivalence test, run outside the repository against the installed moeplan
        args = ["-q", "-p", "no:cacheprovider", "--rootdir", REPO, "-c", REPO / "pyproject.toml",
                "--import-mode=importlib", REPO / "tests" / "model" / "test_hf_equivalence.py"]
        output = _run_fresh(python, PYTEST_THEN_REPORT, *args, scratch=scratch, check=False)
        report = _last_json(output, "REPORT ")
        assert report["exit_code"] == 0 and set(report["outcomes"]) == {"passed"}, output[-4000:]
        assert report["files"]["moeplan.model"].startswith(site), report["files"]
        assert report["files"]["tests.model.hf_reference"].startswith(str(REPO / "tests")), report["files"]
