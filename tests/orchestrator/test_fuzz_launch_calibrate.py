"""``launch`` and ``calibrate`` under hostile input (issue 23), by the rules and profiles of ``test_fuzz.py``.

A valid input would start Ray (``launch``) or measure for seconds (``calibrate``), so the boundary where that
work begins is replaced by an error of its own: ``launch_cmd._resources`` (Ray starts there) and
``calibrate_cmd._device`` (after the real device check; measuring starts there) raise ``ReachedWork``, one line,
exit 2. Everything before it is the real command: every example must end in exit 2 with one line, within
``ERROR_LIMIT_S`` (torch imported beforehand, as a warm process has it), with nothing written; an example that got through all the checks is told apart by its
line (``MOEPLAN_FUZZ_STATS`` records it: the counts in docs/results/fuzz.md).

``launch``: the tiny cpu plan (mostly) or a mutated one, a folder, a device, garbage; ``--run-dir`` in the
way; ``--resume`` of a run directory whose ``launch.json``, ``checkpoints/latest``, checkpoint meta or plan
copy is missing, mutated, binary, deep, huge or a folder; hostile ``--steps``, ``--guard-every``,
``--checkpoint-every``, ``--max-failures``, ``--budget-guard``, ``--dtype``, an ``--address`` malformed,
where nothing answers (closed ports on the loopback) or where something answers that is not Ray (HTTP/1.1, a
closed connection, another HTTP/2 frame; ``address_servers``), ``--address-timeout-s``. ``calibrate``: ``--plan``
mutated or conflicting with ``--model``; ``--model``/``--cluster``/``--nodes``/``--set`` hostile; ``--reps``,
``--threads``, ``--dtype``, ``--name`` and bad ``--out`` paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeplan.orchestrator import calibrate_cmd, launch_cmd
from moeplan.orchestrator.cli import app
from moeplan.orchestrator.errors import InputError
from tests.orchestrator.address_servers import AddressServer
from tests.orchestrator.fuzz_inputs import choice, flags, garbage, int_text, mostly, mutated_document, out_path
from tests.orchestrator.fuzz_run_inputs import _replace
from tests.orchestrator.test_fuzz import PROFILES, _fuzz

REACHED = "fuzz: every check passed; the real command would start its work here"
CPU_PLAN = ["plan", "--model", "tiny-moe", "--cluster", "cpu", "--nodes", "1", "--no-search", "--micro-batch-size", "1",
            "--pp", "2", "--schedule", "1f1b", "--global-batch", "4", "--microbatches", "4", "--budget-gpu-hours", "10",
            "--set", "cluster.node.gpus_per_node=2", "--set", "training.optimizer.moment_bytes=4"]
SETTINGS = {"dtype": "fp32", "budget_guard": "off", "guard_every": 5, "checkpoint_every": 1, "max_failures": 0,
            "steps": 4}
RESTARTS = [{"at_step": 1, "reason": "worker failed", "lost_gpu_hours": 0.001}]  # restarts.json: rank 0 appends
META = {"steps_done": 2, "tokens_seen": 128.0, "world_size": 2, "saved_unix_s": 1.0}


class ReachedWork(InputError):
    """Raised where the real command would start Ray or measure."""


def _reached(*args: Any, **kwargs: Any) -> None:
    raise ReachedWork(REACHED)


@pytest.fixture
def no_work(monkeypatch):
    # Once a plan passes the first checks, launch validates it with the runtime's own code and calibrate asks
    # torch for the device: a cold process pays ~3 s of torch import there, once (not what a refusal costs)
    import moeplan.model.runtime.rank  # noqa: F401
    import moeplan.model.runtime.worker  # noqa: F401

    real_device = calibrate_cmd._device
    monkeypatch.setattr(launch_cmd, "_resources", _reached)
    monkeypatch.setattr(calibrate_cmd, "_device", lambda inputs: (real_device(inputs), _reached()))


@pytest.fixture(scope="module")
def cpu_plan(tmp_path_factory) -> dict[str, Any]:
    """The tiny cpu plan (2 processes), its document, and a resumable run of it (launch.json, a checkpoint)."""
    root = tmp_path_factory.mktemp("launch")
    result = CliRunner().invoke(app, [*CPU_PLAN, "--out", str(root / "plan")])
    assert result.exit_code == 0, result.output
    run = root / "run"
    (run / "checkpoints" / "step2").mkdir(parents=True)
    shutil.copy(root / "plan" / "plan.json", run / "plan.json")
    doc = json.loads((root / "plan" / "plan.json").read_text())
    (run / "launch.json").write_text(json.dumps(SETTINGS))
    (run / "checkpoints" / "step2" / "moeplan.json").write_text(json.dumps(META | {"plan_sha256": doc["inputs_sha256"]}))
    (run / "checkpoints" / "latest").write_text("step2\n")
    dcp.save({"model/x": torch.arange(4.0)}, checkpoint_id=run / "checkpoints" / "step2")  # .metadata, __0_0.distcp
    (run / "restarts.json").write_text(json.dumps(RESTARTS))
    return {"path": root / "plan" / "plan.json", "doc": doc, "run": run}


def _plan_arg(draw: st.DrawFn, folder: Path, plan: dict[str, Any]) -> str:
    how = draw(mostly(st.just("good"), st.sampled_from(["mutated", "mutated", "mutated", "folder", "device",
                                                        "missing", "garbage"])))
    if how == "mutated":
        (folder / "plan.json").write_bytes(draw(mutated_document(plan["doc"], plan=True)))
        return str(folder / "plan.json")
    return {"good": str(plan["path"]), "folder": str(folder), "device": "/dev/zero",
            "missing": str(folder / "nope.json")}.get(how) or draw(garbage)


def _resume_dir(draw: st.DrawFn, folder: Path, plan: dict[str, Any]) -> str:
    """A copy of the resumable run with up to two of its files made hostile (sometimes none)."""
    run = folder / "resume"
    shutil.copytree(plan["run"], run)
    targets = {"launch.json": SETTINGS, "checkpoints/latest": None, "checkpoints/step2/moeplan.json": META,
               "plan.json": plan["doc"], "restarts.json": RESTARTS, "checkpoints/step2/__0_0.distcp": None}
    for name in draw(st.lists(st.sampled_from(sorted(targets)), max_size=2, unique=True)):
        path, how = run / name, draw(st.sampled_from(["mutate", "mutate", "missing", "folder", "device", "binary",
                                                      "deep", "huge", "text", "pipe"]))
        if how == "mutate" and targets[name] is not None:
            path.write_bytes(draw(mutated_document(targets[name], plan=name == "plan.json")))
        elif how == "text" or (how == "mutate" and targets[name] is None):
            path.write_text(draw(st.sampled_from(["step9\n", "../../..\n", "", "step2/../../..\n", "x" * 300 + "\n",
                                                  "\x1b[2J\n", "latest\n", "step2.tmp\n"])))
        elif how == "missing":
            path.unlink()
        else:
            _replace(path, how)
    return str(run)


@pytest.fixture(scope="module")
def addresses():
    """Listening fakes for --address: one answering as gRPC does (passes), and ones that are not Ray (answering
    at once; the silent ones, which cost the probe's whole timeout, are test_ray_address.py's)."""
    made = [AddressServer(kind) for kind in ("grpc", "http", "goaway", "close")]
    yield [server.address for server in made]
    for server in made:
        server.close()


@pytest.mark.parametrize("examples", PROFILES)
def test_launch(examples, tmp_path, cpu_plan, no_work, addresses):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        options = {
            "--steps": int_text(1, 8), "--guard-every": int_text(1, 8), "--checkpoint-every": int_text(0, 8),
            "--max-failures": int_text(0, 3), "--budget-guard": choice("off", "warn", "stop"),
            "--dtype": choice("fp32", "bf16"), "--json": st.none(),
            "--run-dir": out_path(folder),
            "--address": st.sampled_from(["auto", "127.0.0.1:1", "ray://127.0.0.1:9", "abc", "host:", ":1", "[::1]:1",
                                          "127.0.0.1:99999", "127.0.0.1:١٢", "ray://", "127.0.0.1:0", *addresses,
                                          *[f"ray://{a}" for a in addresses]]),
            "--address-timeout-s": mostly(st.just("0.5"), st.sampled_from(["0", "-1", "nan", "inf", "61", "abc"])),
        }
        args = ["launch", *flags(draw, options, 4)]
        if draw(st.integers(0, 3)) == 0:  # --resume, sometimes with a PLAN (its own or another)
            args += ["--resume", draw(mostly(st.just("run"), st.sampled_from(["file", "missing", "long"]), garbage))]
            args[-1] = {"run": lambda: _resume_dir(draw, folder, cpu_plan), "file": lambda: str(cpu_plan["path"]),
                        "missing": lambda: str(folder / "gone"), "long": lambda: str(folder / ("r" * 300))}.get(
                args[-1], lambda: args[-1])()
            if draw(st.booleans()):
                args.insert(1, _plan_arg(draw, folder, cpu_plan))
        else:
            args.insert(1, _plan_arg(draw, folder, cpu_plan))
        return args, []
    _fuzz(examples, tmp_path, case)


# A resumed run's files that only the workers read (found by a generated set, 2026-12-06): each was a traceback
# from rank 0 after Ray had started (restarts.json, a shard cut short) or a launch that never returned (a pipe).
RESUME_FILES = {
    "restarts.json NaN": ("restarts.json", b'[{"at_step": NaN}]', "restarts.json: NaN is not a JSON number"),
    "restarts.json negative step": ("restarts.json", b'[{"at_step": -1, "reason": "x", "lost_gpu_hours": 0}]',
                                    "restarts.json: 0.at_step: Input should be greater than or equal to 0"),
    "restarts.json an object": ("restarts.json", b'{"at_step": 1}', "restarts.json: Input should be a valid list"),
    "latest a pipe": ("checkpoints/latest", None, "checkpoints/latest: not a regular file"),
    "a shard a pipe": ("checkpoints/step2/__0_0.distcp", None, "__0_0.distcp: not a regular file"),
    "restarts.json a pipe": ("restarts.json", None, "restarts.json: malformed JSON"),
    "a shard emptied": ("checkpoints/step2/__0_0.distcp", b"", "__0_0.distcp: 0 bytes, but the checkpoint's metadata"),
    "metadata not a pickle": ("checkpoints/step2/.metadata", b"\x00junk", ".metadata: not a checkpoint's metadata"),
    "metadata naming a command": ("checkpoints/step2/.metadata", b"cos\nsystem\n(S'true'\ntR.",
                                  "names os.system, which is not checkpoint metadata"),
}


@pytest.mark.parametrize("case", RESUME_FILES)
def test_a_resumed_run_s_hostile_files_are_one_line(tmp_path, cpu_plan, no_work, case):
    name, data, message = RESUME_FILES[case]
    run = tmp_path / "run"
    shutil.copytree(cpu_plan["run"], run)
    (run / name).unlink()
    if data is None:
        os.mkfifo(run / name)
    else:
        (run / name).write_bytes(data)
    res = CliRunner().invoke(app, ["launch", "--resume", str(run)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr and REACHED not in res.stderr, res.stderr


@pytest.mark.parametrize("examples", PROFILES)
def test_calibrate(examples, tmp_path, cpu_plan, no_work):
    def case(draw: st.DrawFn, folder: Path) -> tuple[list[str], list[str]]:
        options = {
            "--reps": int_text(1, 5), "--threads": int_text(1, 2), "--dtype": choice("fp32", "bf16"),
            "--name": mostly(st.just("cal"), garbage), "--json": st.none(),
        }
        source = draw(st.sampled_from(["plan", "plan", "model", "both"]))
        args = ["calibrate", "--out", draw(out_path(folder, ".json")), *flags(draw, options, 3)]
        if source in ("plan", "both"):
            args += ["--plan", _plan_arg(draw, folder, cpu_plan)]
        if source in ("model", "both"):
            args += ["--model", draw(choice("tiny-moe", "tiny-dense")), *flags(draw, {
                "--cluster": choice("cpu", "h200", "h800"), "--nodes": int_text(1, 2),
                "--set": st.sampled_from(["parallel.pp=2", "parallel.pp=0", "parallel=3", "model.hidden_size=nan",
                                          "cluster.node.gpus_per_node=2", "nope=1",
                                          "training.phases.0.seq_len_tokens=1e999"]),
            }, 3)]
        return args, []
    _fuzz(examples, tmp_path, case)
