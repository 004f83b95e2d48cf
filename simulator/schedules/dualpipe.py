"""DualPipe and DualPipeV (DeepSeek-V3 §3.2.1; deepseek-ai/DualPipe), written from the phase table.

Both run the same eight phases on every rank, with two local chunks ("phase 0" and "phase 1"):

=====  =======================================  ============
phase  content                                  repeats
=====  =======================================  ============
1      F0                                       2 (n-h-1)
2      F0, F1                                   h+1
3      I1, W, F1 (zero-bubble split)            n-h-1
4      F0&B1, F1&B0 (overlapped pairs)          C - 2n + h + 1
5      B1, F1&B0                                n-h-1
6      B1, B0 (second half split into I + W)    h+1
7      W, I0                                    n-h-1
8      W                                        h+1
=====  =======================================  ============

``W`` always runs the oldest pending weight pass (first in, first out). On the middle rank(s)
(``h = n-1``) the first pair of phase 4 runs un-overlapped, F0 then B1, which shortens the bubble.

- DualPipe, ``pp`` ranks and ``pp`` stages: ``n = pp/2``, ``h = min(r, pp-1-r)``, ``C = M/2``. Rank ``r``
  holds stage ``r`` of the down direction (micro-batches ``0..M/2-1``, entering at rank 0) and stage
  ``pp-1-r`` of the up direction (``M/2..M-1``, entering at rank ``pp-1``). Phase 0 is the direction
  in which the rank sits in the first half of the pipeline.
- DualPipeV, ``pp`` ranks and ``2 pp`` stages: ``n = pp``, ``h = r``, ``C = M``. Rank ``r`` holds stages
  ``r`` (phase 0) and ``2pp-1-r`` (phase 1); every micro-batch walks down and back up the "V".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moeplan.simulator.schedules._checks import require_no_error, require_positive
from moeplan.simulator.schedules.actions import Action, Op
from moeplan.simulator.schedules.schedule import Schedule, StageRanks


@dataclass(frozen=True)
class _Chunk:
    stage: int
    first_microbatch: int  # global id of the first micro-batch this chunk sees


def _rank_actions(n: int, h: int, count: int, chunks: tuple[_Chunk, _Chunk]) -> list[Action]:
    """The eight phases for one rank: ``n`` half-pipeline length, ``h`` distance from the pipeline
    end, ``count`` micro-batches per chunk, ``chunks[p]`` the chunk of phase ``p``."""
    next_f, next_b = [0, 0], [0, 0]
    pending_w: deque[Op] = deque()
    actions: list[Action] = []

    def fwd(p: int) -> Op:
        next_f[p] += 1
        return Op(kind="F", stage=chunks[p].stage, microbatch=chunks[p].first_microbatch + next_f[p] - 1)

    def bwd(p: int, split: bool = False) -> Op:
        next_b[p] += 1
        mb = chunks[p].first_microbatch + next_b[p] - 1
        if split:
            pending_w.append(Op(kind="W", stage=chunks[p].stage, microbatch=mb))
        return Op(kind="I" if split else "B", stage=chunks[p].stage, microbatch=mb)

    def run(*ops: Op) -> None:
        actions.append(Action(ops=ops))

    for _ in range(2 * (n - h - 1)):  # Step 1: F0
        run(fwd(0))
    for _ in range(h + 1):  # Step 2: F0 F1
        run(fwd(0))
        run(fwd(1))
    for _ in range(n - h - 1):  # Step 3: I1 W F1
        run(bwd(1, split=True))
        run(pending_w.popleft())
        run(fwd(1))
    for i in range(count - 2 * n + h + 1):  # Step 4: F0&B1 F1&B0
        if i == 0 and h == n - 1:
            run(fwd(0))
            run(bwd(1))
        else:
            run(fwd(0), bwd(1))
        run(fwd(1), bwd(0))
    for _ in range(n - h - 1):  # Step 5: B1 F1&B0
        run(bwd(1))
        run(fwd(1), bwd(0))
    split = False
    for i in range(h + 1):  # Step 6: B1 B0, the second half split
        split = split or (i == (h + 1) // 2 and h % 2 == 1)
        run(bwd(1, split))
        split = split or (i == (h + 1) // 2 and h % 2 == 0)
        run(bwd(0, split))
    for _ in range(n - h - 1):  # Step 7: W I0
        run(pending_w.popleft())
        run(bwd(0, split=True))
    while pending_w:  # Step 8: W
        run(pending_w.popleft())
    assert next_f == next_b == [count, count], f"{next_f=} {next_b=} {count=} {n=} {h=}"
    return actions


def dualpipe_stage_ranks(pp: int) -> StageRanks:
    """Down the pipeline stage ``s`` runs on rank ``s``, up it runs on the mirror ``pp-1-s``."""
    return (tuple(range(pp)), tuple(reversed(range(pp))))


def dualpipev_stage_ranks(pp: int) -> StageRanks:
    """The "V": stages ``r`` and ``2pp-1-r`` on rank ``r``, one direction."""
    stages = 2 * pp
    return (tuple(min(s, stages - 1 - s) for s in range(stages)),)


def dualpipe_pp_error(pp: int) -> str | None:
    """Why DualPipe cannot run on ``pp`` ranks, or None when it can."""
    return None if pp % 2 == 0 else f"pp={pp} must be even for dualpipe (rank r pairs with rank pp-1-r)"


def dualpipe_microbatch_error(pp: int, num_microbatches: int) -> str | None:
    """Why ``num_microbatches`` cannot run DualPipe on ``pp`` ranks (as deepseek-ai/DualPipe
    asserts: even, and at least ``2 pp``), or None when it can."""
    if num_microbatches % 2:
        return f"microbatches={num_microbatches} must be even for dualpipe (half per direction)"
    if num_microbatches < 2 * pp:
        return f"microbatches={num_microbatches} must be >= 2*pp={2 * pp} for dualpipe"
    return None


def dualpipev_microbatch_error(pp: int, num_microbatches: int) -> str | None:
    """Why ``num_microbatches`` cannot run DualPipeV on ``pp`` ranks (fewer than its ``2 pp``
    stages), or None when it can."""
    if num_microbatches < 2 * pp:
        return f"microbatches={num_microbatches} must be >= 2*pp={2 * pp} (the number of stages) for dualpipev"
    return None


def dualpipe(pp: int, num_microbatches: int) -> Schedule:
    """DualPipe on ``pp`` ranks (= ``pp`` stages, each held twice). Needs ``pp`` even and
    ``num_microbatches`` even and at least ``2 pp`` (as deepseek-ai/DualPipe asserts)."""
    require_positive(pp=pp, microbatches=num_microbatches)
    require_no_error(dualpipe_pp_error(pp))
    require_no_error(dualpipe_microbatch_error(pp, num_microbatches))
    half = num_microbatches // 2
    ranks = []
    for r in range(pp):
        down, up = _Chunk(r, 0), _Chunk(pp - 1 - r, half)
        chunks = (up, down) if r >= pp // 2 else (down, up)
        ranks.append(tuple(_rank_actions(pp // 2, min(r, pp - 1 - r), half, chunks)))
    return Schedule(
        kind="dualpipe",
        num_ranks=pp,
        num_stages=pp,
        num_microbatches=num_microbatches,
        stage_ranks=dualpipe_stage_ranks(pp),
        direction_microbatches=(half, half),
        ranks=tuple(ranks),
    )


def dualpipev(pp: int, num_microbatches: int) -> Schedule:
    """DualPipeV on ``pp`` ranks and ``2 pp`` stages. Needs ``num_microbatches >= 2 pp``."""
    require_positive(pp=pp, microbatches=num_microbatches)
    require_no_error(dualpipev_microbatch_error(pp, num_microbatches))
    stages = 2 * pp
    return Schedule(
        kind="dualpipev",
        num_ranks=pp,
        num_stages=stages,
        num_microbatches=num_microbatches,
        stage_ranks=dualpipev_stage_ranks(pp),
        direction_microbatches=(num_microbatches,),
        ranks=tuple(
            tuple(_rank_actions(pp, r, num_microbatches, (_Chunk(r, 0), _Chunk(stages - 1 - r, 0))))
            for r in range(pp)
        ),
    )
