"""The plan's ranks as Ray actors in one placement group: resources, topology, restarts after failures.

- ``start_ray(address, num_cpus)``: join a cluster (``address``), or start a local one bound to
  127.0.0.1 without dashboard or token auth (``RAY_AUTH_MODE=disabled``), with ``num_cpus`` logical CPUs.
- ``missing_resources(plan, nodes)``: what the plan needs that the cluster's nodes lack, one line, or
  None. Checked before anything is placed: an infeasible request would otherwise wait forever.
- ``RankGroup``: one placement group of one bundle per plan node (``gpus_per_node`` GPUs or, on a
  ``cpu`` cluster, processes; STRICT_PACK for one node, STRICT_SPREAD over several, so each bundle is
  one host), and one ``RankActor`` per plan rank in bundle ``rank // gpus_per_node``. After the actors
  start, ``check_topology`` verifies that every node's ranks share one host and, on GPUs, hold one GPU
  each. ``run`` drives the attempts: each rank runs ``rank_entry.run_rank``; when any rank fails (an
  exception or a dead process) every actor is killed and, up to ``max_failures`` times, a new group
  resumes from the run's latest checkpoint; then ``LaunchFailed``.

Why placement groups and not Ray Train's ``TorchTrainer``: docs/design/launch.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeplan.orchestrator.errors import RunFailedError, crash_log, one_line
from moeplan.orchestrator.rank_entry import RankJob, on_cpu, run_rank
from moeplan.simulator.contracts.plan_file import PlanFile

PLACEMENT_TIMEOUT_S = 10.0
POLL_S = 0.5
FAILURE_GRACE_S = 2.0


class LaunchFailed(RunFailedError):
    """The run failed more often than ``max_failures`` allows; the message is one line."""


def start_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to Ray; True when this call started a local cluster (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        return False
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    return True


def needed_per_node(plan: PlanFile) -> dict[str, float]:
    g = plan.inputs.cluster.node.gpus_per_node
    return {"CPU": float(g)} if on_cpu(plan) else {"CPU": float(g), "GPU": float(g)}


def missing_resources(plan: PlanFile, nodes: list[dict[str, float]]) -> str | None:
    """What ``plan`` needs that the alive ``nodes`` (each node's total resources) lack, or None."""
    need, count = needed_per_node(plan), plan.inputs.cluster.nodes
    unit = "processes (CPU)" if on_cpu(plan) else "GPUs"
    fits = sum(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes)
    if fits >= count:
        return None
    have = {k: sum(node.get(k, 0.0) for node in nodes) for k in need}
    shown = ", ".join(f"{k}={v:g}" for k, v in have.items())
    return (f"the plan needs {count} node(s) of {need['CPU']:g} {unit} ({plan.layout.world} ranks: "
            f"{', '.join(f'{k}={v:g}' for k, v in need.items())} per node) but the Ray cluster has {fits} such "
            f"node(s) ({len(nodes)} node(s) in all, {shown})")


def cluster_nodes() -> list[dict[str, float]]:
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


@ray.remote
class RankActor:
    """One plan rank: where it runs, and the rank's training (``rank_entry.run_rank``)."""

    def where(self) -> dict:
        return {"hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def run(self, job: RankJob) -> str | None:
        return run_rank(job)


def check_topology(places: list[dict], gpus_per_node: int, gpus: bool) -> None:
    """Ranks [k g, (k+1) g) on one host, hosts distinct per plan node, one distinct GPU per rank."""
    nodes = [places[k:k + gpus_per_node] for k in range(0, len(places), gpus_per_node)]
    for k, ranks in enumerate(nodes):
        if len({p["node_id"] for p in ranks}) != 1:
            raise LaunchFailed(f"plan node {k}: ranks {k * gpus_per_node}..{(k + 1) * gpus_per_node - 1} landed on "
                               f"hosts {sorted({p['hostname'] for p in ranks})}, not one")
        if gpus and (any(len(p["gpus"]) != 1 for p in ranks) or len({p["gpus"][0] for p in ranks}) != len(ranks)):
            raise LaunchFailed(f"plan node {k}: ranks hold GPUs {[p['gpus'] for p in ranks]}, not one distinct each")
    if len({ranks[0]["node_id"] for ranks in nodes}) != len(nodes):
        raise LaunchFailed(f"{len(nodes)} plan nodes share hosts {[ranks[0]['hostname'] for ranks in nodes]}")


@dataclasses.dataclass
class RankGroup:
    """The placement group and the actors of one launch (``create``, ``run``, ``close``)."""

    plan: PlanFile
    pg: object
    local: bool
    actors: list = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, plan: PlanFile, local: bool, timeout_s: float = PLACEMENT_TIMEOUT_S) -> RankGroup:
        count = plan.inputs.cluster.nodes
        pg = placement_group([needed_per_node(plan)] * count, strategy="STRICT_PACK" if count == 1 else "STRICT_SPREAD")
        if not pg.wait(timeout_seconds=timeout_s):
            remove_placement_group(pg)
            raise LaunchFailed(f"Ray could not place {count} bundle(s) of {needed_per_node(plan)} within {timeout_s:g}"
                               f" s (busy cluster?)")
        return cls(plan, pg, local)

    def _start(self) -> tuple[list, str, int]:
        g, gpu = self.plan.inputs.cluster.node.gpus_per_node, not on_cpu(self.plan)
        self.actors = [RankActor.options(num_cpus=1, num_gpus=1 if gpu else 0, max_concurrency=2,
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(
                                             self.pg, placement_group_bundle_index=r // g)).remote()
                       for r in range(self.plan.layout.world)]
        places = ray.get([a.where.remote() for a in self.actors])
        check_topology(places, g, gpu)
        master = "127.0.0.1" if self.local else places[0]["ip"]
        return places, master, ray.get(self.actors[0].free_port.remote())

    def run(self, make_job: Callable[[int, str, int, list, object], RankJob], max_failures: int,
            on_poll: Callable[[], None] = lambda: None) -> str | None:
        """Attempts until one finishes; returns rank 0's status. ``make_job(rank, master, port, places,
        failure)`` builds each rank's job; ``failure`` is None, or (the error line, unix time) of the last one."""
        failures, failure = 0, None
        while True:
            places, master, port = self._start()
            refs = [a.run.remote(make_job(r, master, port, places, failure)) for r, a in enumerate(self.actors)]
            error = _wait(refs, on_poll)
            self._kill()
            if error is None:
                return ray.get(refs[0])
            failures += 1
            if failures > max_failures:
                raise LaunchFailed(f"the run failed {failures} time(s) (--max-failures {max_failures}); last: {error}")
            failure = (error, time.time())

    def _kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        self._kill()
        remove_placement_group(self.pg)


def _wait(refs: list, on_poll: Callable[[], None]) -> str | None:
    """Wait for every rank; None when all finished, else the failure as one line. When one rank fails the
    others soon fail too (their peer is gone): a rank whose process died is named first, the rest after
    ``FAILURE_GRACE_S``."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        on_poll()
        errors = _errors(refs, done)
        if errors:
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S) if pending else ([], [])
            errors |= _errors(refs, more)
            died = [r for r, exc in sorted(errors.items()) if isinstance(exc, RayActorError)]
            rank = died[0] if died else min(errors)
            line = f"rank {rank}: {_first_line(errors[rank])}"
            log = crash_log(errors[rank])  # the whole remote traceback (Ray's, with colour codes): in a file
            where = f"traceback in {log}" if log else "its traceback could not be written"
            print(f"moeplan: {one_line(line)} ({where})", file=sys.stderr, flush=True)
            return line
    return None


def _errors(refs: list, done: list) -> dict[int, Exception]:
    out = {}
    for ref in done:
        try:
            ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            out[refs.index(ref)] = exc
    return out


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_OURS = re.compile(r"(?<=/)(model|orchestrator|simulator|kernels|manifests)/[^/].*\.py$")


def _innermost_frame(text: str) -> str:
    """' (at model/x.py:12 in f)': the last traceback frame in moeplan's own code, else the last frame."""
    frames = [(_OURS.search(path), path, line, func) for path, line, func in _FRAME.findall(text)]
    ours = [f for f in frames if f[0]]
    if not (ours or frames):
        return ""
    match, path, line, func = (ours or frames)[-1]
    return f" (at {match.group(0) if match else path}:{line} in {func})"


def _first_line(exc: Exception) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        line = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        return f"{type(cause).__name__}: {line[:300]}{_innermost_frame(str(exc))}"
    if isinstance(exc, RayActorError):
        return "the process died (ActorDiedError)"
    return f"{type(exc).__name__}"[:300]
