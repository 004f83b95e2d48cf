"""What the overlapped F&B (``overlap``) communicates through, and the streams it issues on.

- ``DistComm``: ``all_to_all_single(async_op=True)`` over the EP group; ``LoopbackComm``: one GPU, each
  all-to-all a device copy of the same bytes on the communication stream; ``RecordingComm``: logs
  launches, waits and compute nodes in issue order (the structural overlap test).
- ``Streams``: on CUDA the compute stream C (the current one), one high-priority communication stream X,
  and each micro-batch chain's latest event; on CPU empty contexts. ``planned_sync`` is the one host
  sync per layer (the all-to-all split sizes), allowed under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeplan.kernels.copy_loop import copy_loop

# ---- communication facades --------------------------------------------------------------------------------

class DistComm:
    """``all_to_all_single(async_op=True)``. On CUDA the current stream (X) waits for it at once, the host
    never; on CPU the host waits in ``wait``, which returns the completion time (gloo's callback)."""

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int] | None,
                   in_splits: Sequence[int] | None, group: dist.ProcessGroup, name: str) -> object:
        work = dist.all_to_all_single(out, inp, None if out_splits is None else list(out_splits),
                                      None if in_splits is None else list(in_splits), group=group, async_op=True)
        if out.is_cuda:
            work.wait()  # X waits for the NCCL stream; the host does not
            return None
        done: list[float] = []
        work.get_future().add_done_callback(lambda _: done.append(time.perf_counter()))
        return work, done

    def wait(self, handle: object, name: str) -> float | None:
        if handle is None:
            return None
        work, done = handle
        if work is not None:
            work.wait()
        return done[0] if done else time.perf_counter()

    def note(self, kind: str, name: str) -> None:
        """A compute node is issued (``RecordingComm`` logs it)."""


class LoopbackComm(DistComm):
    """One GPU, no peer: each all-to-all is a copy of the same bytes on the current stream (X), repeated
    ``repeat`` times to stand for a link that many times slower than a device copy.

    ``sms`` (CUDA): the copy is ``kernels.copy_loop`` on that many SMs (``repeat`` passes) instead of torch's
    copy over every free SM. A link's all-to-all kernel holds a few SMs (DeepEP's: 20-24, TR §3.2.2) and moves
    the bytes through HBM only at the link's rate; a copy spread over the whole GPU and repeated to last as long
    takes ``repeat`` times the HBM traffic, which the compute beside it pays for."""

    def __init__(self, repeat: int = 1, sms: int | None = None) -> None:
        if sms is not None and sms < 1:
            raise ValueError(f"LoopbackComm: sms={sms} must be at least 1")
        self.repeat, self.sms = repeat, sms

    def all_to_all(self, out, inp, out_splits, in_splits, group, name):
        assert out.shape == inp.shape, f"a loopback all-to-all keeps every row: {out.shape=} {inp.shape=}"
        words = _fp32_words(inp, out) if self.sms is not None and out.is_cuda else None
        if words is not None:
            copy_loop(*words, blocks=self.sms, passes=self.repeat)
        else:
            for _ in range(self.repeat):
                out.copy_(inp)
        return None if out.is_cuda else (None, [time.perf_counter()])


def _fp32_words(inp: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both tensors' bytes as 1-D fp32 views (what ``copy_loop`` moves), or None where they are not contiguous
    or not a whole number of 4-byte words (then torch's copy)."""
    if not (inp.is_contiguous() and out.is_contiguous()) or (inp.numel() * inp.element_size()) % 4:
        return None
    return inp.view(-1).view(torch.uint8).view(torch.float32), out.view(-1).view(torch.uint8).view(torch.float32)


@dataclass
class RecordingComm:
    """Wraps a facade; logs ``(kind, name)`` for every launch, wait and compute node, in issue order."""

    inner: DistComm
    log: list[tuple[str, str]] = field(default_factory=list)

    def all_to_all(self, out, inp, out_splits, in_splits, group, name):
        self.log.append(("launch", name))
        return self.inner.all_to_all(out, inp, out_splits, in_splits, group, name)

    def wait(self, handle, name):
        self.log.append(("wait", name))
        return self.inner.wait(handle, name)

    def note(self, kind: str, name: str) -> None:
        self.log.append((kind, name))


# ---- streams and events --------------------------------------------------------------------------------

class Streams:
    """CUDA: compute stream C (the current one), communication stream X, each chain's latest event;
    CPU: empty contexts. ``planned_syncs`` counts the host syncs taken for split sizes."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.comm = torch.cuda.Stream(device=device, priority=-1) if self.cuda else None
        self.last: dict[str, torch.cuda.Event] = {}
        self.planned_syncs = 0

    @contextlib.contextmanager
    def compute(self, chain: str):
        if not self.cuda:
            yield
            return
        stream = torch.cuda.current_stream()
        if chain in self.last:
            stream.wait_event(self.last[chain])
        yield
        self.last[chain] = stream.record_event()

    @contextlib.contextmanager
    def communicate(self, chain: str):
        """Under X, after the chain's latest event; the chain moves on only when a consumer waits."""
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.comm):
            if chain in self.last:
                self.comm.wait_event(self.last[chain])
            yield

    def planned_sync(self, tensor: torch.Tensor) -> list:
        """``tensor.tolist()``, the one host sync per layer (split sizes); on CUDA read on X, so it waits for
        communication issued before it, not for the compute queued on C. Allowed in sync debug mode."""
        self.planned_syncs += 1
        if not self.cuda:
            return tensor.tolist()
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            with torch.cuda.stream(self.comm):
                return tensor.tolist()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
