"""A rank's compute stream when communication kernels borrow SMs only while they run.

DeepSeek-V3 gives its all-to-all kernels 20 of the H800's 132 SMs (TR §3.2.2, DeepEP's ``num_sms``):
those SMs are busy while a dispatch or combine kernel runs, and free otherwise. So compute runs on
every SM except while an all-to-all of this GPU is in flight, and on ``sm_count - comm_sms`` SMs then
(issue 21, capability 1). How much of a layer's compute meets an all-to-all is the schedule's: in 1F1B
only the shared expert beside the dispatch; in DualPipe's F&B most of the other micro-batch's compute.

Each compute job has two durations, ``full_s`` (all SMs) and ``slow_s`` (the SMs left beside an
all-to-all; the cost model prices both, ``engine/build.py``). It advances at ``1 / full_s`` of its work per
second outside the all-to-all intervals and ``1 / slow_s`` inside them. The stream is first come, first
served. An all-to-all issued while a job is already queued or running (the other micro-batch of an F&B
pair) stretches that job and every job behind it: ``add_comm`` replans them, and a waiting process
re-arms its timeout until its job's end stops moving (``ComputeLane.end_of``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class Job:
    """One compute job: queued at ``request_s``; ``start_s``/``end_s`` as currently planned."""

    name: str
    request_s: float
    full_s: float
    slow_s: float
    start_s: float = 0.0
    end_s: float = 0.0


class ComputeLane:
    """FIFO compute stream with SM-sharing all-to-all intervals (disjoint, sorted ``[start, end)``)."""

    def __init__(self) -> None:
        self.comm_starts: list[float] = []
        self.comm_ends: list[float] = []
        self.jobs: list[Job] = []  # queued or running, in stream order
        self.free_at = 0.0  # end of the last finished job

    def submit(self, now_s: float, full_s: float, slow_s: float, name: str) -> Job:
        """Queue a job at ``now_s``; its planned end is ``job.end_s`` (it may move, see ``add_comm``)."""
        job = Job(name, now_s, full_s, slow_s)
        self._plan(job, self.jobs[-1].end_s if self.jobs else self.free_at)
        self.jobs.append(job)
        return job

    def finish(self, job: Job) -> None:
        """The job has ended (the caller's clock reached ``job.end_s``): drop it and the intervals before it."""
        assert self.jobs and self.jobs[0] is job, f"{job.name=} finished out of stream order"
        self.jobs.pop(0)
        self.free_at = job.end_s
        horizon = self.jobs[0].start_s if self.jobs else job.end_s
        drop = bisect.bisect_right(self.comm_ends, horizon)
        del self.comm_starts[:drop], self.comm_ends[:drop]

    def add_comm(self, start_s: float, end_s: float) -> None:
        """An all-to-all holds the communication SMs over ``[start_s, end_s)``; replan the jobs it meets."""
        if end_s <= start_s:
            return
        lo = bisect.bisect_left(self.comm_ends, start_s)  # first interval that may touch it
        hi = bisect.bisect_right(self.comm_starts, end_s)
        if lo < hi:  # merge with the intervals it overlaps or touches
            start_s, end_s = min(start_s, self.comm_starts[lo]), max(end_s, self.comm_ends[hi - 1])
        self.comm_starts[lo:hi], self.comm_ends[lo:hi] = [start_s], [end_s]
        previous_end = self.free_at
        for job in self.jobs:
            if job.end_s > start_s:
                self._plan(job, previous_end)
            previous_end = job.end_s

    def _plan(self, job: Job, previous_end_s: float) -> None:
        job.start_s = max(job.request_s, previous_end_s)
        job.end_s = self._end(job.start_s, job.full_s, job.slow_s)

    def _end(self, t: float, full_s: float, slow_s: float) -> float:
        """When a job of ``full_s`` (``slow_s`` beside an all-to-all) started at ``t`` ends."""
        if full_s <= 0:
            return t
        work = 1.0  # fraction of the job left
        i = bisect.bisect_right(self.comm_ends, t)  # first interval ending after t
        while i < len(self.comm_starts):
            start, end = self.comm_starts[i], self.comm_ends[i]
            if start > t:  # all SMs until the interval
                if t + work * full_s <= start:
                    return t + work * full_s
                work -= (start - t) / full_s
                t = start
            if t + work * slow_s <= end:  # fewer SMs inside it
                return t + work * slow_s
            work -= (end - t) / slow_s
            t = end
            i += 1
        return t + work * full_s
