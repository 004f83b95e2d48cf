"""``submit`` and ``status`` against a hostile API server and bad kubeconfigs, case by case (``test_fuzz_run_commands``
draws the same at random): each failure one exact line, exit 2, within its timeout, one request per try."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from tests.orchestrator.fuzz_run_inputs import STATUS_BODY, HostileApiServer, kubeconfig_doc
from tests.orchestrator.run_dirs import tiny_plan  # noqa: F401 -- a fixture

RUNNING = json.dumps({"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}).encode()
PODS = json.dumps({"items": [{"status": {"phase": "Running"}}] * 2}).encode()


@pytest.fixture
def server():
    hostile = HostileApiServer()
    yield hostile
    hostile.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_plan) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("k") / "rayjob"
    assert CliRunner().invoke(app, ["manifests", str(tiny_plan), "--out", str(out)]).exit_code == 0
    return out


def _kubeconfig(tmp_path: Path, url: str, **cluster) -> str:
    doc = kubeconfig_doc(url)
    doc["clusters"][0]["cluster"].update(cluster)
    (tmp_path / "kc").write_text(json.dumps(doc))
    return str(tmp_path / "kc")


def _run(*args: str) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr, time.perf_counter() - start


def test_status_of_a_job_that_never_ends_is_bounded_by_timeout_s(server, tmp_path):
    server.script([(200, RUNNING, 0.0), (200, PODS, 0.0), (200, RUNNING, 0.0), (200, PODS, 0.0)] * 50)
    code, out, err, seconds = _run("status", "job", "--kubeconfig", _kubeconfig(tmp_path, server.url),
                                   "--timeout-s", "0.5", "--interval-s", "0.1")
    assert code == 2 and err.splitlines() == [("moeplan: error: --timeout-s 0.5: RayJob/job has not ended (Running "
                                              "(job RUNNING)); it runs on, watch again with a longer --timeout-s")]
    assert out == "RayJob/job: Running (job RUNNING); pods: 2 Running\n"  # printed once: nothing changed
    assert 0.5 <= seconds < 4


def test_a_hanging_server_costs_one_request_timeout(server, tmp_path):
    server.script([(200, RUNNING, 3.0)])
    code, _out, err, seconds = _run("status", "job", "--kubeconfig", _kubeconfig(tmp_path, server.url),
                                   "--request-timeout-s", "0.3")
    assert code == 2 and err.splitlines() == [(f"moeplan: error: get RayJob/job: no answer from the API server at "
                                              f"{server.url} within --request-timeout-s 0.3")]
    assert server.served == 1 and seconds < 3  # urllib3 retried a GET three times before: four timeouts


def test_server_text_reaches_the_terminal_as_one_printable_line(server, tmp_path):
    failed = {"status": {"jobDeploymentStatus": "Failed", "reason": "\x1b[2J\x1b]0;owned\x07\nsecond line"}}
    server.script([(200, json.dumps(failed).encode(), 0.0), (200, PODS, 0.0)])
    code, out, err, _ = _run("status", "job", "--kubeconfig", _kubeconfig(tmp_path, server.url))
    assert code == 1 and err == "" and "\x1b" not in out and len(out.splitlines()) == 2
    assert out.splitlines()[-1] == r"RayJob/job failed: Failed (job - \x1b[2J\x1b]0;owned\x07\nsecond line)"


@pytest.mark.parametrize("status, body, line", [
    (500, STATUS_BODY, "the API server answered 500 Internal Server Error: scripted"),
    (200, "not json", "the API server's answer: malformed JSON (Expecting value at line 1 column 1)"),
    (200, [1, 2], "the API server answered a list, not an object"),
])
def test_status_answers_that_are_not_a_job(server, tmp_path, status, body, line):
    server.script([(status, body.encode() if isinstance(body, str) else json.dumps(body).encode(), 0.0)])
    code, _, err, _ = _run("status", "job", "--kubeconfig", _kubeconfig(tmp_path, server.url))
    assert code == 2 and err.splitlines() == [f"moeplan: error: get RayJob/job: {line}"]


def test_submit_that_cannot_undo_says_so_in_its_one_line(server, tmp_path, folder):
    # dry run ConfigMap, dry run RayJob, create ConfigMap, create RayJob (refused), delete ConfigMap (refused)
    server.script([(201, b"{}", 0.0)] * 3 + [(500, json.dumps(STATUS_BODY).encode(), 0.0)])
    code, _, err, _ = _run("submit", str(folder), "--kubeconfig", _kubeconfig(tmp_path, server.url))
    assert code == 2 and len(err.splitlines()) == 1
    assert "create RayJob/moeplan-tiny-moe-" in err and "the API server answered 500" in err
    assert "; and could not undo it: delete ConfigMap/moeplan-tiny-moe-" in err and err.endswith("(delete it by hand)\n")


@pytest.mark.parametrize("text, line", [
    ("[1]", "a kubeconfig is a mapping, not a list"),
    ("[" * 5000 + "]" * 5000, "not YAML (while increasing flow level exceeded maximum nesting depth"),
    ("a: &a [x,x]\nb: [*a,*a]\n", "holds a YAML alias (*name); a kubeconfig needs none"),
    ('{"contexts": 5}', "contexts must be a list, not int"),
    ('{"contexts": [{"name": "a", "context": 5}]}', "contexts[0].context=5 must be a mapping"),
])
def test_malformed_kubeconfig_is_one_line(tmp_path, text, line):
    (tmp_path / "kc").write_text(text)
    code, _, err, seconds = _run("status", "job", "--kubeconfig", str(tmp_path / "kc"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"moeplan: error: --kubeconfig {tmp_path / 'kc'}: {line}") and seconds < 2, err


def test_a_server_without_a_scheme_and_a_failing_exec_plugin(tmp_path):
    code, _, err, _ = _run("status", "job", "--kubeconfig", _kubeconfig(tmp_path, "127.0.0.1:6443"))
    assert code == 2 and err == (f"moeplan: error: --kubeconfig {tmp_path / 'kc'}: cluster server='127.0.0.1:6443' "
                                 "is not an https:// (or http://) URL with a host\n")
    doc = kubeconfig_doc("http://127.0.0.1:9")
    doc["users"][0]["user"] = {"exec": {"command": "false", "apiVersion": "client.authentication.k8s.io/v1beta1"}}
    (tmp_path / "kc").write_text(json.dumps(doc))
    code, _, err, _ = _run("status", "job", "--kubeconfig", str(tmp_path / "kc"))
    assert code == 2 and err == ("moeplan: error: get RayJob/job: cannot reach the API server at http://127.0.0.1:9 "
                                 "(NewConnectionError); the client logged: exec: process returned 1\n")
