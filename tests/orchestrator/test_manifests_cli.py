"""``moeplan manifests``, ``submit`` and ``status`` in-process (typer's CliRunner). Submit and status run the
official kubernetes client against a fake API server (``tests/manifests/fake_apiserver.py``: a real HTTP
server on 127.0.0.1) through a kubeconfig written in tmp_path; the tests assert the exact requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from tests.manifests.fake_apiserver import FakeApiServer, kubeconfig, status_body

NS = "default"
CM_PATH = f"/api/v1/namespaces/{NS}/configmaps"
RJ_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
JS_PATH = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"


def _run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny plan (2 x 8 H200, with a budget) and its RayJob manifests."""
    root = tmp_path_factory.mktemp("k8s")
    plan = _run("plan", "--model", "tiny-moe", "--cluster", "h200", "--nodes", "2", "--pp", "2", "--ep", "8",
                "--budget-gpu-hours", "100", "--out", str(root / "plan"))
    assert plan.exit_code == 0, plan.output
    result = _run("manifests", str(root / "plan"), "--kind", "rayjob", "--out", str(root / "out"))
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture
def fake(tmp_path):
    server = FakeApiServer()
    http, url = server.start()
    server.kubeconfig = str(kubeconfig(tmp_path / "kubeconfig", url))
    yield server
    http.shutdown()
    http.server_close()


def _docs(folder: Path) -> tuple[dict, dict]:
    return (yaml.safe_load((folder / "plan-configmap.yaml").read_text()),
            yaml.safe_load((folder / "rayjob.yaml").read_text()))


def test_manifests_writes_and_validates(folder) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["plan-configmap.yaml", "rayjob.yaml"]
    result = _run("manifests", "--validate", str(folder))
    assert result.exit_code == 0 and result.output.startswith("valid: CRD schema (strict)")


def test_bad_option_is_one_line_and_nothing_written(folder, tmp_path) -> None:
    plan = folder.parent / "plan"
    for args, line in (
        (["--namespace", "Bad_NS"], "moeplan: error: namespace: namespace='Bad_NS' must be at most 63"),
        (["--kind", "pod"], "moeplan: error: --kind 'pod': must be one of rayjob, jobset"),
        (["--pod-security", "baseline"], "moeplan: error: manifests: 1 problem(s) found by layer(s) policy"),
        (["--kubernetes-version", "1.99"], "moeplan: error: kubernetes_version='1.99' is not one of 1.25..1.37"),
    ):
        result = _run("manifests", str(plan), "--out", str(tmp_path / "out"), *args)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith(line), result.output
        assert not (tmp_path / "out").exists()


def test_validate_reports_a_seeded_mistake_with_its_layer(folder, tmp_path) -> None:
    cm, job = _docs(folder)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagee"] = "x"
    (tmp_path / "plan-configmap.yaml").write_text(yaml.safe_dump(cm))
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(job))
    result = _run("manifests", "--validate", str(tmp_path))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert [line.split(" ")[0] for line in lines[:-1]] == ["[schema]", "[pod]"]  # inside a pod template: both see it
    assert lines[-1] == "moeplan: error: manifests: 2 problem(s) found by layer(s) pod, schema (listed above)"


@pytest.mark.parametrize("template", ["x", None], ids=["a string", "null"])
def test_a_job_of_the_wrong_shape_is_the_schemas_not_a_crash(folder, tmp_path, template) -> None:
    """The long fuzz profile (2026-12-06): a pod template that is not an object reached the policy layer,
    which indexes it (AttributeError, exit 3, 11 of 400 examples); the policy now waits for the schema."""
    cm, job = _docs(folder)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"] = template
    (tmp_path / "plan-configmap.yaml").write_text(yaml.safe_dump(cm))
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(app, ["manifests", "--validate", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stdout.startswith("[schema]") and "[policy]" not in result.stdout, result.stdout
    assert result.stderr.splitlines()[-1].startswith("moeplan: error: manifests: "), result.stderr


def _script_created(fake: FakeApiServer) -> None:
    fake.script("POST", CM_PATH, 201, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x"}})
    fake.script("POST", RJ_PATH, 201, {"kind": "RayJob"})


def test_submit_sends_the_dry_runs_then_the_creates(folder, fake) -> None:
    _script_created(fake)
    result = _run("submit", str(folder), "--kubeconfig", fake.kubeconfig)
    assert result.exit_code == 0, result.output
    assert fake.calls() == [("POST", CM_PATH, "All"), ("POST", RJ_PATH, "All"),
                            ("POST", CM_PATH, None), ("POST", RJ_PATH, None)]
    cm, job = _docs(folder)
    assert [r.body for r in fake.requests] == [cm, job, cm, job]
    assert all(r.query["fieldValidation"] == ["Strict"] for r in fake.requests)
    assert f"moeplan status {job['metadata']['name']}" in result.output


def test_submit_dry_run_creates_nothing(folder, fake) -> None:
    _script_created(fake)
    assert _run("submit", str(folder), "--dry-run", "--kubeconfig", fake.kubeconfig).exit_code == 0
    assert fake.calls() == [("POST", CM_PATH, "All"), ("POST", RJ_PATH, "All")]


@pytest.mark.parametrize(("status", "body", "line"), [
    (409, status_body(409, "AlreadyExists", 'rayjobs.ray.io "x" already exists'),
     "already exists in namespace default; to replace it, delete it first (kubectl delete -f DIR) and submit again"),
    (422, status_body(422, "Invalid", "RayJob is invalid", [
        {"type": "FieldValueInvalid", "field": "spec.backoffLimit", "message": "must be >= 0"},
        {"type": "FieldValueRequired", "field": "spec.entrypoint", "message": "Required value"}]),
     "invalid (spec.backoffLimit: must be >= 0; spec.entrypoint: Required value)"),
    (403, status_body(403, "Forbidden", 'rayjobs.ray.io is forbidden: User "tester" cannot create'),
     'forbidden (403) in namespace default: rayjobs.ray.io is forbidden: User "tester" cannot create'),
    (401, status_body(401, "Unauthorized", "Unauthorized"), "not authenticated (401) in namespace default"),
])
def test_submit_refusals_are_one_line_and_nothing_is_created(folder, fake, status, body, line) -> None:
    fake.script("POST", CM_PATH, 201, {"kind": "ConfigMap"})
    fake.script("POST", RJ_PATH, status, body)
    result = _run("submit", str(folder), "--kubeconfig", fake.kubeconfig)
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("moeplan: error: create (dry run) RayJob/moeplan-tiny-moe-") and line in last, last
    assert fake.calls() == [("POST", CM_PATH, "All"), ("POST", RJ_PATH, "All")]


def test_a_failed_create_deletes_what_it_created(folder, fake) -> None:
    fake.script("POST", CM_PATH, 201, {"kind": "ConfigMap"})
    fake.script("POST", RJ_PATH, 201, {"kind": "RayJob"})  # the dry run passes ...
    fake.script("POST", RJ_PATH, 403, status_body(403, "Forbidden", "quota"))  # ... the create does not
    cm, _ = _docs(folder)
    fake.script("DELETE", f"{CM_PATH}/{cm['metadata']['name']}", 200, {"kind": "Status", "status": "Success"})
    result = _run("submit", str(folder), "--kubeconfig", fake.kubeconfig)
    assert result.exit_code == 2 and "create RayJob" in result.output
    assert fake.calls() == [("POST", CM_PATH, "All"), ("POST", RJ_PATH, "All"), ("POST", CM_PATH, None),
                            ("POST", RJ_PATH, None), ("DELETE", f"{CM_PATH}/{cm['metadata']['name']}", None)]


def test_submit_refuses_an_invalid_folder_before_any_request(folder, fake, tmp_path) -> None:
    cm, job = _docs(folder)
    job["spec"]["activeDeadlineSeconds"] = 60
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([cm, job]))
    result = _run("submit", str(tmp_path), "--kubeconfig", fake.kubeconfig)
    assert result.exit_code == 2 and "[policy] a.yaml#1 RayJob/" in result.output
    assert fake.requests == []


def test_unknown_context_is_one_line(folder, fake) -> None:
    result = _run("submit", str(folder), "--kubeconfig", fake.kubeconfig, "--context", "nope")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith(
        "moeplan: error: --context nope: cannot use the kubeconfig")


def _pods(*phases: str) -> dict:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {},
            "items": [{"metadata": {"name": f"p{i}"}, "status": {"phase": p}} for i, p in enumerate(phases)]}


@pytest.mark.parametrize(("final", "code", "verdict"), [
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, 0, "succeeded: Complete (job SUCCEEDED)"),
    ({"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded"}, 1,
     "failed: Failed (job RUNNING DeadlineExceeded)"),
])
def test_status_follows_a_rayjob_to_its_result(fake, final, code, verdict) -> None:
    name = "moeplan-tiny"
    for status in ({"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                   final):
        fake.script("GET", f"{RJ_PATH}/{name}", 200, {"kind": "RayJob", "metadata": {"name": name}, "status": status})
    for phases in (("Pending", "Pending"), ("Running", "Running", "Running"), ("Succeeded",)):
        fake.script("GET", f"/api/v1/namespaces/{NS}/pods", 200, _pods(*phases))
    result = _run("status", name, "--kubeconfig", fake.kubeconfig, "--interval-s", "0.01")
    assert result.exit_code == code, result.output
    assert result.output.splitlines() == [
        f"RayJob/{name}: Initializing (job -); pods: 2 Pending",
        f"RayJob/{name}: Running (job RUNNING); pods: 3 Running",
        f"RayJob/{name}: {verdict.split(': ', 1)[1]}; pods: 1 Succeeded",
        f"RayJob/{name} {verdict}",
    ]
    pod_query = next(r.query for r in fake.requests if r.path.endswith("/pods"))
    assert pod_query["labelSelector"] == [f"moeplan.dev/job={name}"]


def test_status_finds_a_jobset_and_reads_its_conditions(fake) -> None:
    name = "moeplan-js"
    fake.script("GET", f"{JS_PATH}/{name}", 200, {"kind": "JobSet", "status": {"restarts": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "FailedJobs"}]}})
    fake.script("GET", f"/api/v1/namespaces/{NS}/pods", 200, _pods())
    result = _run("status", name, "--kubeconfig", fake.kubeconfig, "--interval-s", "0.01")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"JobSet/{name} failed: Failed (FailedJobs, restarts 1)"
    assert fake.calls() == [("GET", f"{RJ_PATH}/{name}", None), ("GET", f"{JS_PATH}/{name}", None),
                            ("GET", f"/api/v1/namespaces/{NS}/pods", None)]


def test_status_of_no_such_job_is_one_line(fake) -> None:
    result = _run("status", "ghost", "--kubeconfig", fake.kubeconfig)
    assert result.exit_code == 2
    assert result.output.strip() == "moeplan: error: NAME 'ghost': no RayJob or JobSet of that name in namespace default"


def test_findings_cannot_drive_the_terminal(folder, tmp_path) -> None:
    """The long fuzz profile (2026-12-06): a ConfigMap whose apiVersion held an escape sequence was printed raw in
    the pod layer's finding; findings are now one printable line each."""
    cm, job = _docs(folder)
    cm["apiVersion"] = "\x1b]0;t\x07\x1b[2J"
    (tmp_path / "plan-configmap.yaml").write_text(yaml.safe_dump(cm))
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(app, ["manifests", "--validate", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "\x1b" not in result.stdout + result.stderr and "\\x1b]0;t\\x07" in result.stdout, result.stdout


def test_submit_refuses_a_bad_request_timeout_before_validating(folder) -> None:
    """The long fuzz profile: `--request-timeout-s inf` was refused after the seconds of validation (4.1 s)."""
    result = CliRunner().invoke(app, ["submit", str(folder), "--request-timeout-s", "inf"])
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.splitlines() == ["moeplan: error: --request-timeout-s inf: must be in (0, 600]"]


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**400], ids=["2**64", "-2**63-1", "10**400"])
@pytest.mark.parametrize("command", ["manifests", "submit"])
def test_an_integer_beyond_int64_is_one_line(folder, tmp_path, command, value) -> None:
    """The long fuzz profile (2026-12-06 afternoon): an integer outside Go's int64 in a manifest overflowed CEL's
    int type (``ValueError: overflow``, exit 3, in ``manifests --validate`` and ``submit``); now one line."""
    cm, job = _docs(folder)
    job["spec"]["backoffLimit"] = value
    (tmp_path / "plan-configmap.yaml").write_text(yaml.safe_dump(cm))
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(job))
    args = (["manifests", "--validate", str(tmp_path)] if command == "manifests" else
            ["submit", str(tmp_path), "--kubeconfig", str(tmp_path / "no-kubeconfig")])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    shown = str(value) if value.bit_length() <= 256 else "an integer of 1329 bits"
    assert line == (f"moeplan: error: {tmp_path / 'rayjob.yaml'}: spec.backoffLimit={shown}: outside Kubernetes' "
                    "64-bit integers (-9223372036854775808..9223372036854775807)"), line


@pytest.mark.parametrize("value", [None, 5, True], ids=["null", "a number", "a boolean"])
def test_a_jobset_whose_replicated_jobs_are_not_a_list_is_a_finding(folder, tmp_path, value) -> None:
    """The long fuzz profile (2026-12-06 afternoon): 53 exit 3 of 400 ``manifests --validate`` examples."""
    plan = folder.parent / "plan"
    assert _run("manifests", str(plan), "--kind", "jobset", "--out", str(tmp_path / "js")).exit_code == 0
    job = yaml.safe_load((tmp_path / "js" / "jobset.yaml").read_text())
    job["spec"]["replicatedJobs"] = value
    (tmp_path / "js" / "jobset.yaml").write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(app, ["manifests", "--validate", str(tmp_path / "js")])
    assert result.exit_code == 2 and result.stdout.startswith("[schema]"), result.output


@pytest.mark.parametrize("field,value", [("rayClusterSpec", 5), ("rayClusterSpec", None),
                                         ("rayClusterSpec.workerGroupSpecs", True),
                                         ("rayClusterSpec.headGroupSpec", [1])])
def test_a_rayjob_with_a_field_of_the_wrong_type_is_a_finding(folder, tmp_path, field, value) -> None:
    """The RayJob twin of the JobSet case above: a number, null, boolean or list where an object or a list of
    objects belongs is the schema layer's finding, exit 2, not an error in the pod layer's walk."""
    job = yaml.safe_load((folder / "rayjob.yaml").read_text())
    *parents, last = ["spec", *field.split(".")]
    target = job
    for key in parents:
        target = target[key]
    target[last] = value
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(app, ["manifests", "--validate", str(tmp_path)])
    assert result.exit_code == 2 and result.stdout.startswith("[schema]"), result.output
