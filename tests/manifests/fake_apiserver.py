"""A fake Kubernetes API server for the submit and status tests: a real ``http.server`` on 127.0.0.1 in a
thread, serving the discovery documents (``/version``, ``/api``, ``/apis``) and whatever responses a test
scripts per (method, path), recording every request (method, path, query, JSON body). A kubeconfig that
points the official client at it is written by ``kubeconfig``.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

DISCOVERY = {
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
         "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
        for g, v in (("ray.io", "v1"), ("jobset.x-k8s.io", "v1alpha2"), ("batch", "v1"))]},
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class FakeApiServer:
    """Scripted responses: ``script(method, path, status, body)`` queues one; the last one queued for a
    (method, path) repeats. Unscripted requests get 404 NotFound."""

    requests: list[Request] = field(default_factory=list)
    responses: dict[tuple[str, str], deque] = field(default_factory=lambda: defaultdict(deque))

    def script(self, method: str, path: str, status: int, body: Any) -> None:
        self.responses[(method, path)].append((status, body))

    def respond(self, method: str, path: str) -> tuple[int, Any]:
        if method == "GET" and path in DISCOVERY:
            return 200, DISCOVERY[path]
        queue = self.responses.get((method, path))
        if not queue:
            return 404, status_body(404, "NotFound", f"{path} not found")
        return queue.popleft() if len(queue) > 1 else queue[0]

    def start(self) -> tuple[ThreadingHTTPServer, str]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append(Request(self.command, url.path, parse_qs(url.query),
                                             json.loads(raw) if raw else None))
                status, body = fake.respond(self.command, url.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    def calls(self, discovery: bool = False) -> list[tuple[str, str, str | None]]:
        """(method, path, dryRun) of each request, discovery left out unless asked."""
        return [(r.method, r.path, (r.query.get("dryRun") or [None])[0]) for r in self.requests
                if discovery or r.path not in DISCOVERY]


def status_body(code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A ``metav1.Status`` failure as the API server sends it."""
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if causes is not None:
        body["details"] = {"causes": causes}
    return body


def kubeconfig(path: Path, url: str, context: str = "fake", namespace: str = "default") -> Path:
    """A kubeconfig with one context ``context`` pointing at ``url`` (a bearer token, no TLS)."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "secret-token"}}],
        "contexts": [{"name": context, "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
    }))
    return path
