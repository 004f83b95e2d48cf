"""``check``, ``manifests`` (and ``--validate``), ``submit`` and ``status`` under hostile input (issue 23), by the
rules and profiles of ``test_fuzz.py`` (its ``check``): exit 0 or 2 (and the commands' verdict 1: ``check``'s
miss, ``status``'s failed job), never a traceback, one line on an error, nothing changed or half-written,
strict JSON, quick failure.

Inputs come from ``fuzz_run_inputs``: corrupt run directories, mutated plans and manifests, bad ``--out``
and ``--validate`` paths, kubeconfigs that are malformed or point nowhere, and an API server on 127.0.0.1
answering 500s, garbage or nothing at all (``--request-timeout-s 0.5``; ``status --timeout-s`` at most a
second, so a job that never ends is one line too). Commands that list findings or progress before failing
(manifests, submit, status) may have stdout on exit 2; their error is still the one stderr line, within
``NETWORK_LIMIT_S`` where a server is involved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# The manifest checkers' libraries (cel-python, kubernetes-validate) load when a manifests command first checks
# something, not when the CLI starts (the GPU image lacks them; test_cli_import.py). A process pays that once,
# ~0.4 s idle; loaded here so that the fuzz's refusal clock times the command, not the first library import.
import celpy  # noqa: F401
import kubernetes_validate  # noqa: F401
import pytest
import yaml
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.contracts.plan_file import read_plan
from moeplan.simulator.costs.tables import default_tables
from tests.orchestrator.fuzz_inputs import (
    choice,
    flags,
    float_text,
    garbage,
    int_text,
    mostly,
    mutated_document,
    out_path,
)
from tests.orchestrator.fuzz_run_inputs import (
    JOB_STATUSES,
    HostileApiServer,
    answer,
    corrupt_run,
    kubeconfig_path,
    name_text,
    yaml_text,
)
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- a fixture
from tests.orchestrator.test_fuzz import PROFILES, _fuzz

NETWORK_LIMIT_S = 4.0  # a refusal after at most a few request timeouts of 0.5 s
TIMEOUT = mostly(st.just("0.5"), st.sampled_from(["0", "-1", "nan", "inf", "1e309", "601", "abc", ""]))
# status --timeout-s: bounded (an accepted value must end the watch), else refused
WATCH = mostly(st.sampled_from(["0.5", "1"]), st.sampled_from(["0", "-1", "nan", "-inf", "abc", "", "1.2.3"]))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_plan) -> dict[str, Any]:  # noqa: F811
    """A good synthetic run directory to copy and corrupt, with its run.json and a trace as documents."""
    run = synthetic_run(tmp_path_factory.mktemp("base") / "run", tiny_plan)
    return {"dir": run, "plan": tiny_plan, "run.json": json.loads((run / "run.json").read_text()),
            "trace": json.loads((run / "traces" / "rank0.json").read_text())}


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, tiny_plan) -> dict[str, Path]:  # noqa: F811
    """The tiny plan's manifests, a folder per kind."""
    root = tmp_path_factory.mktemp("manifests")
    for kind in ("rayjob", "jobset"):
        result = CliRunner().invoke(app, ["manifests", str(tiny_plan), "--kind", kind, "--out", str(root / kind)])
        assert result.exit_code == 0, result.output
    return {"rayjob": root / "rayjob", "jobset": root / "jobset"}


@pytest.fixture(scope="module")
def server():
    hostile = HostileApiServer()
    yield hostile
    hostile.close()


def _plan_file(draw: st.DrawFn, folder: Path, plan_dir: Path) -> str:
    """A plan path: mostly the good one, else mutated, a folder without one, a device or garbage."""
    how = draw(mostly(st.just("good"), st.sampled_from(["mutated", "mutated", "folder", "device", "garbage"])))
    if how == "mutated":
        (folder / "mutated-plan.json").write_bytes(draw(mutated_document(json.loads((plan_dir / "plan.json")
                                                                                     .read_text()), plan=True)))
        return str(folder / "mutated-plan.json")
    return {"good": str(plan_dir / "plan.json"), "folder": str(folder), "device": "/dev/zero"}.get(how) or draw(garbage)


@pytest.mark.parametrize("examples", PROFILES)
def test_check(examples, tmp_path, base_run):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        run = folder / "run"
        shutil.copytree(base_run["dir"], run, ignore=shutil.ignore_patterns("run.html"))
        draw(corrupt_run(run, base_run["run.json"], base_run["trace"]))
        options = {"--tolerance": float_text(0, 1), "--json": st.none()}
        args = ["check", draw(mostly(st.just(str(run)), st.sampled_from([str(folder / "nowhere"), "/dev/null",
                                                                         str(folder / ("r" * 300))]), garbage)),
                *flags(draw, options, 2)]
        if draw(st.integers(0, 4)) == 0:  # --plan: another file than the run's
            args += ["--plan", _plan_file(draw, folder, base_run["plan"])]
        return args, [str(run / "run.html")] if args[1] == str(run) else []
    _fuzz(examples, tmp_path, case, verdicts=(1,))


def _tables_file(draw: st.DrawFn, folder: Path, plan_dir: Path) -> str:
    """A ``--recalibrate-from`` path: the tables the plan was priced with as a file (mutated half the time), or a
    folder, a device, a missing file or garbage."""
    how = draw(mostly(st.sampled_from(["good", "mutated"]), st.sampled_from(["folder", "device", "nowhere"]),
                      garbage))
    if how in ("good", "mutated"):
        tables = default_tables(read_plan(plan_dir).inputs.cluster.gpu.name).model_dump(mode="json")
        text = draw(mutated_document(tables)) if how == "mutated" else json.dumps(tables).encode()
        (folder / "tables.json").write_bytes(text)
        return str(folder / "tables.json")
    return {"folder": str(folder), "device": "/dev/zero", "nowhere": str(folder / "nowhere.json")}.get(how, how)


@pytest.mark.parametrize("examples", PROFILES)
def test_check_recalibrate(examples, tmp_path, base_run):
    """``check --recalibrate FILE``: a corrupt run, a hostile FILE (``out_path``) and ``--recalibrate-from``; on
    exit 0 or 1 both ``RUN/run.html`` and FILE are whole, strict JSON, on 2 nothing is written."""
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        run = folder / "run"
        shutil.copytree(base_run["dir"], run, ignore=shutil.ignore_patterns("run.html"))
        draw(corrupt_run(run, base_run["run.json"], base_run["trace"]))
        out = draw(out_path(folder, ".json"))
        args = ["check", str(run), "--recalibrate", out,
                *flags(draw, {"--tolerance": float_text(0, 1), "--json": st.none()}, 2)]
        if draw(st.booleans()):  # else the tables the plan names
            args += ["--recalibrate-from", _tables_file(draw, folder, base_run["plan"])]
        return args, [str(run / "run.html"), out]
    _fuzz(examples, tmp_path, case, verdicts=(1,))


@pytest.mark.parametrize("examples", PROFILES)
def test_manifests(examples, tmp_path, base_run):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        kind = draw(choice("rayjob", "jobset"))
        out = draw(out_path(folder))
        options = {
            "--namespace": choice("default", "ml"), "--image": choice("moeplan:1"), "--queue": choice("q"),
            "--name": choice("job-1"), "--cpu-per-gpu": int_text(1, 32), "--memory-per-gpu-gib": int_text(1, 256),
            "--checkpoint-interval-s": float_text(60, 7200), "--restart-overhead-s": float_text(0, 600),
            "--pod-security": choice("privileged", "baseline", "restricted"), "--rdma-resource": choice("none"),
            "--kubernetes-version": choice("1.31", "1.33"), "--service-account": choice("trainer"),
        }
        args = ["manifests", _plan_file(draw, folder, base_run["plan"]), "--kind", kind, "--out", out,
                *flags(draw, options, 3)]
        return args, [f"{out}/plan-configmap.yaml", f"{out}/{kind}.yaml"]
    _fuzz(examples, tmp_path, case, listing=True)


def _manifest_folder(draw: st.DrawFn, folder: Path, manifests: dict[str, Path]) -> str:
    """A copy of a good manifest folder with one or two files made hostile (sometimes none)."""
    kind = draw(st.sampled_from(sorted(manifests)))
    target = folder / "manifests"
    shutil.copytree(manifests[kind], target)
    files = sorted(target.iterdir())
    for path in draw(st.lists(st.sampled_from(files), max_size=2, unique=True)):
        path.write_bytes(yaml_text(draw, yaml.safe_load(path.read_text())))
    return str(target)


@pytest.mark.parametrize("examples", PROFILES)
def test_manifests_validate(examples, tmp_path, manifests):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        where = draw(mostly(st.just("folder"), st.sampled_from(["file", "missing", "long", "device"]), garbage))
        path = {"folder": lambda: _manifest_folder(draw, folder, manifests), "file": lambda: str(folder / "taken"),
                "missing": lambda: str(folder / "nope"), "long": lambda: str(folder / ("v" * 300)),
                "device": lambda: "/dev/null"}.get(where, lambda: where)()
        (folder / "taken").write_text("x\n")
        return ["manifests", "--validate", path, *flags(draw, {"--kubernetes-version": choice("1.31", "1.33")}, 1)], []
    _fuzz(examples, tmp_path, case, listing=True)


def _script(draw: st.DrawFn, server: HostileApiServer) -> None:
    """Up to four answers; half the time the first two are a job's status and a pod list, as a server would."""
    plausible = [(200, json.dumps(draw(st.sampled_from(JOB_STATUSES))).encode(), 0.0) for _ in range(2)]
    drawn = [answer(draw) for _ in range(draw(st.integers(1, 4)))]
    server.script(plausible + drawn[2:] if draw(st.booleans()) else drawn)


@pytest.mark.parametrize("examples", PROFILES)
def test_submit(examples, tmp_path, manifests, server):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        _script(draw, server)
        target = (str(manifests[draw(st.sampled_from(sorted(manifests)))]) if draw(st.integers(0, 3))
                  else _manifest_folder(draw, folder, manifests))
        options = {"--dry-run": st.none(), "--context": choice("fake")}
        return ["submit", target, "--kubeconfig", kubeconfig_path(draw, folder, server.url),
                "--request-timeout-s", draw(TIMEOUT), *flags(draw, options, 2)], []
    _fuzz(examples, tmp_path, case, listing=True, error_limit_s=NETWORK_LIMIT_S)


@pytest.mark.parametrize("examples", PROFILES)
def test_status(examples, tmp_path, server):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        _script(draw, server)
        options = {"--namespace": choice("default", "ml"), "--context": choice("fake"),
                   "--interval-s": mostly(st.just("0.2"), st.sampled_from(["0", "nan", "-1", "1e9"]))}
        return ["status", draw(name_text()), "--kubeconfig", kubeconfig_path(draw, folder, server.url),
                "--timeout-s", draw(WATCH), "--request-timeout-s", draw(TIMEOUT), *flags(draw, options, 2)], []
    _fuzz(examples, tmp_path, case, verdicts=(1,), listing=True, error_limit_s=NETWORK_LIMIT_S)
