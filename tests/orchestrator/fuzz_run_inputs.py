"""What ``test_fuzz_run_commands.py`` feeds ``check``, ``manifests``, ``submit`` and ``status``: corrupt run
directories, mutated manifests and kubeconfigs, and a hostile API server, as hypothesis strategies.

A run directory starts as a copy of a synthetic run (``run_dirs.synthetic_run``) and gets one to three
corruptions: ``run.json`` mutated (``fuzz_inputs.mutated_document``) or replaced (binary, deep, huge,
a device, a folder), edited so that it still parses but disagrees with its plan (world size, pipeline
ranks, step times at the bounds, memory), ``metrics.jsonl`` torn, traces missing, corrupt, a device or
named by an absolute or ``..`` path, the plan missing or mutated, a ``plan-trace.json`` of garbage, a
``run.html`` in the way. The API server answers each request with a drawn status, a body that is a
``Status``, not JSON, not an object, ``NaN``, a terminal escape, or nothing for longer than the
client's request timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.orchestrator.fuzz_inputs import garbage, mostly, mutated_document, write_input

HANG_S = 3.0  # a hanging answer comes this late: past any request timeout the tests give
HUGE_BYTES = 64 * 2**20 + 1  # past the readers' limit (a sparse file: cheap to make)


def _plain(path: Path) -> bool:
    """``path`` is a regular file an earlier corruption left alone (or nothing), safe to write."""
    return not path.is_symlink() and (path.is_file() or not path.exists())  # not a folder, a device or a pipe


def _rewrite(path: Path, edit: Any) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _rate(doc: dict[str, Any]) -> None:
    """Keep each step's tokens_per_s_per_gpu consistent, so an edit reaches the comparison."""
    world = doc["settings"]["world_size"]
    for s in doc["steps"]:
        s["tokens_per_s_per_gpu"] = s["tokens"] / s["wall_time_s"] / world


def _remove(path: Path) -> None:
    """Nothing where ``path`` was, whatever an earlier corruption left there (a folder too)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace(path: Path, how: str) -> None:
    """Put something unreadable where ``path`` was."""
    _remove(path)
    if how == "folder":
        path.mkdir()
    elif how == "device":
        path.symlink_to("/dev/zero")
    elif how == "pipe":  # a named pipe nobody writes to: a plain open() of it never returns
        os.mkfifo(path)
    elif how == "huge":
        with open(path, "wb") as f:
            f.truncate(HUGE_BYTES)
    elif how == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "binary":
        path.write_bytes(bytes(range(256)))


# Edits that keep run.json parseable (each step's rate kept consistent) but make it disagree with the plan.
SEMANTIC = {
    "world": lambda d: d["settings"].update(world_size=(w := len(d["settings"]["pp_rank_of"]) // 2),
                                            pp_rank_of=d["settings"]["pp_rank_of"][:w]),
    "pp ranks": lambda d: d["settings"].update(pp_rank_of=list(range(d["settings"]["world_size"]))),
    "fast steps": lambda d: [s.update(wall_time_s=1e-6) for s in d["steps"]],
    "slow steps": lambda d: [s.update(wall_time_s=1e8) for s in d["steps"]],
    "one token": lambda d: [s.update(tokens=1) for s in d["steps"]],
    "many tokens": lambda d: [s.update(tokens=2**62) for s in d["steps"]],
    "huge memory": lambda d: d["step_totals"].update(peak_memory_bytes=[2**62] * d["settings"]["world_size"]),
    "no memory": lambda d: d["step_totals"].update(peak_memory_bytes=None),
    "no steps": lambda d: d.update(steps=[], step_totals={"count": 0, "wall_time_s": 0.0}),
    "all warm-up": lambda d: d["settings"].update(warmup_steps=len(d["steps"])),
    "no traces": lambda d: d.update(traces=[]),
    "absolute trace": lambda d: d["traces"][0].update(path="/etc/hostname"),
    "dotdot trace": lambda d: d["traces"][0].update(path="../run/traces/rank0.json"),
    "plan_file elsewhere": lambda d: d.update(plan_file="../../../../etc/passwd"),
    "plan_file long": lambda d: d.update(plan_file="p" * 300),
    "other plan": lambda d: d.update(plan_sha256="0" * 64),
    "failed": lambda d: d.update(status="failed"),
}


@st.composite
def corrupt_run(draw: st.DrawFn, run_dir: Path, run_json: dict[str, Any], trace: dict[str, Any]) -> None:
    """One to three corruptions of the run directory ``run_dir`` (a copy of a good run); sometimes none."""
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["run.json", "run.json", "semantic", "semantic", "metrics", "trace", "trace",
                                     "plan", "plan-trace", "run.html"]))
        if what == "run.json":
            how = draw(st.sampled_from(["mutate", "mutate", "mutate", "folder", "device", "huge", "deep", "binary",
                                        "missing", "empty", "pipe"]))
            if how == "mutate" and _plain(run_dir / "run.json"):
                (run_dir / "run.json").write_bytes(draw(mutated_document(run_json)))
            elif how == "missing":
                _remove(run_dir / "run.json")
            elif how == "empty" and _plain(run_dir / "run.json"):
                (run_dir / "run.json").write_bytes(b"")
            else:
                _replace(run_dir / "run.json", how)
        elif what == "semantic":
            edit = SEMANTIC[draw(st.sampled_from(sorted(SEMANTIC)))]
            target = run_dir / "run.json"
            if target.is_symlink() or not target.is_file() or target.stat().st_size >= HUGE_BYTES:
                continue  # a device or a folder: reading it would never end (the 20 GB example of a long run)
            with contextlib.suppress(Exception):  # run.json no longer what the edit expects: left as it is
                _rewrite(run_dir / "run.json", lambda d, edit=edit: (edit(d), _rate(d)))
        elif what == "metrics":
            cut = draw(st.sampled_from([b"", b"{\"step\": 9, \"wall", b"\xff\xfe", b"NaN\n", b"[]\n", b"\n\n", None]))
            if cut is None:
                _replace(run_dir / "metrics.jsonl", "pipe")
            elif _plain(run_dir / "metrics.jsonl"):
                with open(run_dir / "metrics.jsonl", "ab") as f:
                    f.write(cut)
        elif what == "trace":
            rank = draw(st.integers(0, 7))
            how = draw(st.sampled_from(["mutate", "mutate", "missing", "folder", "device", "binary", "deep", "pipe"]))
            path = run_dir / "traces" / f"rank{rank}.json"
            if how == "mutate" and _plain(path):
                path.write_bytes(draw(mutated_document(trace)))
            elif how == "missing":
                _remove(path)
            else:
                _replace(path, how)
        elif what == "plan":
            how = draw(st.sampled_from(["missing", "binary", "truncate", "pipe"]))
            if not (run_dir / "plan.json").is_file() or (run_dir / "plan.json").is_symlink():
                continue
            if how == "truncate":
                text = (run_dir / "plan.json").read_bytes()
                (run_dir / "plan.json").write_bytes(text[: draw(st.integers(0, len(text)))])
            else:
                _replace(run_dir / "plan.json", how) if how != "missing" else (run_dir / "plan.json").unlink()
        elif what == "plan-trace":
            (run_dir / "plan-trace.json").write_bytes(draw(mutated_document(trace)))
        else:  # something in the way of run.html, or a previous one that an error must leave intact
            how = draw(st.sampled_from(["previous", "folder", "device"]))
            if how == "previous" and _plain(run_dir / "run.html"):
                (run_dir / "run.html").write_text("<html>previous report</html>\n")
            elif how != "previous":
                _replace(run_dir / "run.html", how)


def yaml_text(draw: st.DrawFn, doc: dict[str, Any]) -> bytes:
    """A manifest as file bytes: mutated (JSON is YAML) or hostile YAML."""
    kind = draw(st.sampled_from(["mutate"] * 6 + ["alias", "tag", "deep", "multi", "scalar"]))
    return {
        "mutate": lambda: draw(mutated_document(doc)),
        "alias": lambda: b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
        "tag": lambda: b"kind: !!python/object/apply:os.system [echo owned]\n",
        "deep": lambda: b"- " * 20_000 + b"x\n",
        "multi": lambda: json.dumps(doc).encode() + b"\n---\n" + json.dumps(doc).encode(),
        "scalar": lambda: b"just text\n",
    }[kind]()


def kubeconfig_doc(url: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "tester", "user": {"token": "secret-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": "default"}}]}


def kubeconfig_path(draw: st.DrawFn, folder: Path, url: str) -> str:
    """Mostly a kubeconfig pointing at ``url``; else mutated, pointing nowhere, missing, a folder, a device."""
    how = draw(mostly(st.just("good"), st.sampled_from(["mutated", "mutated", "nowhere", "missing", "folder",
                                                        "device", "bomb"])))
    if how in ("good", "mutated", "nowhere"):
        doc = kubeconfig_doc("http://127.0.0.1:9" if how == "nowhere" else url)  # port 9 (discard): refused
        data = draw(mutated_document(doc)) if how == "mutated" else json.dumps(doc).encode()
        return write_input(folder, "kubeconfig", data)
    if how == "bomb":
        return write_input(folder, "kubeconfig", b"a: &a [x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\n")
    return {"missing": f"{folder}/no-kubeconfig", "folder": str(folder), "device": "/dev/zero"}[how]


# What the hostile server answers: (status, body bytes, delay before answering in seconds).
STATUS_BODY = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "scripted", "reason": "X"}
BODIES = (
    json.dumps(STATUS_BODY).encode(), b"", b"not json", b"[1, 2]", b"{\"status\": NaN}", b"\xff\xfe",
    json.dumps({**STATUS_BODY, "message": "\x1b[2J\x1b]0;owned\x07", "details": {"causes": [5, {"field": 1}]}}).encode(),
    json.dumps({**STATUS_BODY, "details": "x"}).encode(), b"{" * 5000, json.dumps("x" * 5000).encode(),
)
JOB_STATUSES = (
    {"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}},
    {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}},
    {"status": {"jobDeploymentStatus": "Failed", "reason": "\x1b[31mred\nline"}},
    {"status": {"conditions": [{"type": "Completed", "status": "True"}], "restarts": 2}},
    {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": ["x"]}]}},
    {"status": {"conditions": "Running", "restarts": {"a": 1}}}, {"status": 5}, {"status": None}, {},
    {"items": [{"status": {"phase": "Running"}}, {"status": 5}, 7, {"status": {"phase": ["x"]}}]},
    {"items": "none"},
)


def answer(draw: st.DrawFn) -> tuple[int, bytes, float]:
    status = draw(st.sampled_from([200, 200, 201, 404, 409, 422, 500, 503, 401, 403, 302, 204]))
    body = draw(st.one_of(st.sampled_from(BODIES), st.sampled_from(JOB_STATUSES).map(lambda d: json.dumps(d).encode()),
                          st.binary(max_size=32)))
    return status, body, draw(mostly(st.just(0.0), st.just(HANG_S)))


class HostileApiServer:
    """An HTTP server on 127.0.0.1 answering each request with the next scripted ``(status, body, delay_s)``
    (the last repeats; 404 when none). Its handler threads never print (a client that gave up is no news)."""

    def __init__(self) -> None:
        self.answers: deque[tuple[int, bytes, float]] = deque()
        self.served = 0  # requests answered (or being answered)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body, delay = server.next()
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.http = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def script(self, answers: list[tuple[int, bytes, float]]) -> None:
        with self.lock:
            self.answers = deque(answers)

    def next(self) -> tuple[int, bytes, float]:
        with self.lock:
            self.served += 1
            if not self.answers:
                return 404, json.dumps({**STATUS_BODY, "code": 404, "reason": "NotFound"}).encode(), 0.0
            return self.answers.popleft() if len(self.answers) > 1 else self.answers[0]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def name_text() -> st.SearchStrategy[str]:
    """A job NAME: mostly the one the server knows, else garbage or a path."""
    return mostly(st.just("job"), garbage, st.sampled_from(["../../secrets", "Job_1", "x" * 300, "a/b", "-x"]))

