"""Sharded, atomic training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of a run directory's checkpoints::

    RUN/checkpoints/step{N}/        one committed checkpoint: N steps done (DCP files + .metadata)
    RUN/checkpoints/step{N}/moeplan.json   CheckpointMeta: steps done, tokens seen, plan hash, world, time
    RUN/checkpoints/latest          "step{N}\\n": the checkpoint a resume loads (written atomically)
    RUN/checkpoints/step{N}.tmp/    a checkpoint being written; never read, removed at the next start

``save_checkpoint(rt, run_dir, steps_done)`` is collective: every rank writes its own state into
``step{N}.tmp`` with ``dcp.save`` (DCP's coordinator writes ``.metadata`` once every rank is done), then
after a barrier rank 0 writes the meta file, renames the folder to ``step{N}`` and only then rewrites
``latest``. A crash at any point leaves ``latest`` naming a whole checkpoint (or none).

What each rank saves, and under which key (DCP writes a key held by several ranks once: replicas):
- ``model/{name}``: the rank's parameters and persistent buffers (the gate's
  ``e_score_correction_bias``) by their whole-model name. Data-parallel replicas, DualPipe's mirrored
  stage and the tied MTP embedding hold identical values under one name, so one copy is written;
- ``model/ep{e}/{name}``: routed-expert weights under expert parallelism, where each EP rank holds other
  experts under the same local name;
- ``optim/rank{r}/...``: the rank's ZeRO-1 shard (FP32 master, both moments, per set and bucket) and its
  ``steps_done`` (AdamW's bias correction).
The step, ``tokens_seen`` and the data position (the data is keyed by step: ``data.SyntheticTask``)
are the meta file's. A checkpoint is loaded only by the same plan (``plan_sha256``) on the same world.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from moeplan.model.runtime.checkpoint_reader import UnsafeCheckpointError, load_data_only
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.spec.json_input import read_json_file

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
META_NAME = "moeplan.json"
LATEST_MAX_BYTES = 256  # "step{N}\n" is a few bytes
EXPERT_MARK = ".mlp.experts."  # routed-expert parameter names (as the optimizer's expert set)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here (another plan or world, a missing folder): one line."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    steps_done: int  # the next step to run; also the data position
    tokens_seen: float
    plan_sha256: str
    world_size: int
    saved_unix_s: float
    path: str = ""  # the checkpoint folder (filled when read)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def latest_checkpoint(run_dir: str | Path) -> CheckpointMeta | None:
    """The checkpoint ``latest`` names, or None when the run has none. Read as data from a directory that
    may be corrupt: ``latest`` must name a ``step{N}`` beside it, its meta file must be bounded strict JSON
    with fields of the right types (else ``CheckpointError``, one line)."""
    root = checkpoints_dir(run_dir)
    try:
        with open(root / LATEST_NAME, "rb") as f:  # a device or a huge file: only the first bytes
            name = f.read(LATEST_MAX_BYTES).decode().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{root / LATEST_NAME}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not re.fullmatch(r"step[0-9]{1,15}", name):
        raise CheckpointError(f"{root / LATEST_NAME}: names {name!r:.80}, not a step{{N}} checkpoint")
    folder = root / name
    try:
        raw = read_json_file(folder / META_NAME)
        meta = CheckpointMeta(**raw, path=str(folder))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{root / LATEST_NAME}: names {name!r:.80} whose {META_NAME} cannot be read "
                              f"({str(exc)[:300]})") from None
    types = {"steps_done": int, "tokens_seen": (int, float), "plan_sha256": str, "world_size": int,
             "saved_unix_s": (int, float)}
    wrong = [k for k, t in types.items() if not isinstance(getattr(meta, k), t) or isinstance(getattr(meta, k), bool)]
    if wrong or meta.steps_done < 0 or meta.world_size < 1:
        shown = [f"{k}={getattr(meta, k)!r:.40}" for k in (wrong or ("steps_done", "world_size"))]
        raise CheckpointError(f"{folder / META_NAME}: {', '.join(shown)}: out of type or range")
    return meta


def _state(rt) -> dict[str, torch.Tensor]:
    """This rank's tensors by checkpoint key (live tensors: ``dcp.load`` fills them in place)."""
    ep = rt.plan.layout.ep
    ep_rank = rt.groups.coords(rt.rank).ep_rank
    state: dict[str, torch.Tensor] = {}
    for module in rt.unique_modules():
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = f"model/ep{ep_rank}/{name}" if ep > 1 and EXPERT_MARK in name else f"model/{name}"
            state.setdefault(key, tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
    optim = rt.optimizer.state_dict()
    for s, shards in enumerate(optim["shards"]):
        for b, shard in enumerate(shards):
            for name, tensor in shard.items():
                state[f"optim/rank{rt.rank}/set{s}/bucket{b}/{name}"] = tensor
    state[f"optim/rank{rt.rank}/steps_done"] = torch.tensor(optim["steps_done"], dtype=torch.int64)
    return state


def save_checkpoint(rt, run_dir: str | Path, steps_done: int) -> Path:
    """Collective: write ``step{steps_done}`` (see the module docstring); returns its folder."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"step{steps_done}", root / f"step{steps_done}.tmp"
    if rt.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(_state(rt), checkpoint_id=str(tmp))
    except CheckpointException as exc:  # every rank's failure with its traceback (a BaseException)
        rank, (error, _) = min(exc.failures.items(), key=lambda kv: kv[0])
        raise not_written(root, final, error, f"rank {rank}") from None
    dist.barrier()
    if rt.rank == 0:
        meta = CheckpointMeta(steps_done=steps_done, tokens_seen=float(rt.progress["tokens_seen"]),
                              plan_sha256=rt.plan.inputs_sha256, world_size=dist.get_world_size(),
                              saved_unix_s=time.time())
        fields = dataclasses.asdict(meta)
        fields.pop("path")
        try:
            write_atomic(tmp / META_NAME, json.dumps(fields))
            if final.exists():  # left by an attempt that died before it moved ``latest`` here
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(root / LATEST_NAME, final.name + "\n")
        except OSError as exc:
            raise not_written(root, final, exc, "rank 0") from None
    dist.barrier()
    return final


def not_written(root: Path, final: Path, error: BaseException, who: str) -> OSError:
    """One line for a checkpoint that could not be written (a full disk: ``OSError(ENOSPC)``); ``latest``
    was not moved, so it still names the previous whole checkpoint (its half-written folder goes at the
    next start: ``remove_partial``)."""
    try:
        previous = (root / LATEST_NAME).read_text().strip()[:80] or "nothing"
    except OSError:
        previous = "nothing"
    code = error.errno if isinstance(error, OSError) else None
    reason = error.strerror if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
    return OSError(code, " ".join(f"checkpoint {final.name} not written ({who}: {reason}); {LATEST_NAME} still "
                                  f"names {previous}".split()))


def load_checkpoint(rt, meta: CheckpointMeta) -> None:
    """Collective: load ``meta``'s checkpoint into ``rt`` (weights, biases, optimizer shard, tokens seen)."""
    if meta.plan_sha256 != rt.plan.inputs_sha256:
        raise CheckpointError(f"{meta.path}: plan_sha256={meta.plan_sha256[:12]}... is not this plan's "
                              f"inputs_sha256={rt.plan.inputs_sha256[:12]}...")
    world = dist.get_world_size()
    if meta.world_size != world:
        raise CheckpointError(f"{meta.path}: world_size={meta.world_size} but this run has {world} processes")
    state = _state(rt)
    try:  # data only: the metadata's globals are checked, bytes items refused (checkpoint_reader)
        load_data_only(state, str(meta.path))
    except UnsafeCheckpointError as exc:
        raise CheckpointError(f"{meta.path}: {exc}") from None
    optim = rt.optimizer.state_dict()
    shards = [[{name: state[f"optim/rank{rt.rank}/set{s}/bucket{b}/{name}"] for name in shard}
               for b, shard in enumerate(shards)] for s, shards in enumerate(optim["shards"])]
    rt.optimizer.load_state_dict({"steps_done": int(state[f"optim/rank{rt.rank}/steps_done"]), "shards": shards})
    rt.progress["tokens_seen"] = meta.tokens_seen


def remove_partial(run_dir: str | Path) -> None:
    """Rank 0 at a start: remove ``step*.tmp`` folders an earlier attempt left half-written."""
    for tmp in checkpoints_dir(run_dir).glob("step*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
