"""ZeRO-1 AdamW over FP32 main gradients: the optimizer step of the plan's ``training.optimizer``.

Each ``ShardedParams`` is one ``MainGrads`` (``model.runtime.main_grad``) and the process group that
holds its replicas: the data-parallel group for dense parameters, the expert-data-parallel group for
routed experts (two sets, two buffers). A step, per set and bucket:

1. reduce-scatter the flat FP32 main gradient over the set's group (SUM), divided by ``grad_divisor``
   (the group size by default: the mean; for expert parameters the lead passes the dense data-parallel
   size, since each expert replica already sums the tokens of its EP group);
2. the global gradient norm: every rank's squared shard norms, all-reduced over ``norm_groups`` in turn
   (orthogonal groups whose product is the world, or the world itself). Each element is owned by one
   shard, so nothing counts twice; a set whose shards are owned elsewhere too (DualPipe's mirrored
   stage copy) passes ``in_norm=False``. Clipped like ``torch.nn.utils.clip_grad_norm_``;
3. AdamW on the local shard as ``torch.optim.AdamW`` computes it (decoupled weight decay, bias
   correction), on an FP32 master copy of the parameters; moments stored in BF16 when the plan's
   ``moment_bytes`` is 2 (TR §3.3: the math in FP32, the storage rounded), FP32 when 4;
4. all-gather the updated shards, cast to each bucket's parameter dtype, into the parameters.

Memory is what the plan counts (``simulator.accounting.memory``: parameters, FP32 main gradients, master
weights and two moments per parameter) and no more: the reduced shard is the main-gradient buffer's own
slice (an in-place reduce-scatter; no collective at all on a group of one), the norm reads ``CHUNK``
elements at a time, and step 3 runs ``kernels.adamw`` on a GPU (one pass, no temporaries; the torch
reference ``CHUNK`` elements at a time elsewhere), writing the new weights straight into the parameters on
a group of one. A whole-bucket temporary would cost 4-8 bytes a parameter: on one GPU training V3's
4.31B-parameter stage that is 17-34 GB the plan never counted (an H100 ran out of memory). Over a larger
group the all-gather still needs the whole bucket in the parameters' dtype for a moment (2 bytes a
parameter).

The learning rate of step ``k`` is ``training.optimizer.lr.lr_at(k, tokens_seen)``. ``state_dict()`` /
``load_state_dict()`` hold this rank's shard only (for ``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moeplan.kernels.adamw import adamw_, adamw_ref_
from moeplan.model.runtime.main_grad import GradBucket, MainGrads
from moeplan.simulator.spec.training import OptimizerSpec

if TYPE_CHECKING:
    from moeplan.model.runtime.executor import Timeline

# torch 2.13 renamed the flat collectives (the old names warn); 2.11 has only the old ones. Same signatures.
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coef = max_norm / (norm + 1e-6)
MOMENT_DTYPES = {2: torch.bfloat16, 4: torch.float32}
CHUNK = 1 << 25  # elements per FP32 temporary of the step: 128 MiB


def squared_norm(*grads: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The FP64 squared norm of flat FP32 gradients: FP32 norms of ``CHUNK``-sized parts (one read), their
    squares summed in FP64; a 0-dim tensor on the gradients' device (``device`` when there are none). On a GPU
    the parts' norms are one multi-tensor launch (``torch._foreach_norm``): four small kernels a part, launched
    one by one, kept the V3 stage's 130 parts host-bound (16 ms a step against 7 ms of kernels on an H100)."""
    device = grads[0].device if grads else (device or torch.device("cpu"))
    parts = [part for grad in grads for part in grad.split(CHUNK)]
    if parts and device.type == "cuda":
        return torch.stack(torch._foreach_norm(parts)).double().square().sum()
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for part in parts:
        squares += torch.linalg.vector_norm(part).double().square()
    return squares


def _no_mark(part: str) -> None:
    """``ZeroAdamW.step``'s default ``mark``: parts not timed."""


def part_marker(timeline: Timeline | None, name: str) -> Callable[[str], None]:
    """``mark(part)``: the interval since the last mark (since this call, the first time) becomes the compute
    event ``"{name} {part}"`` of ``timeline``, each end the next part's start; ``_no_mark`` without one."""
    if timeline is None:
        return _no_mark
    last = [timeline.start()]

    def mark(part: str) -> None:
        end = timeline.start()
        timeline.add("compute", f"{name} {part}", last[0], end)
        last[0] = end
    return mark


def clip_coef(norm: float, max_norm: float | None) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` scales gradients by (1.0 without clipping)."""
    return 1.0 if max_norm is None else min(1.0, max_norm / (norm + CLIP_EPS))


def adamw_update(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor, **kwargs) -> None:
    """AdamW over one stretch of a shard: ``kernels.adamw`` in one pass on a GPU (22 bytes a parameter); the
    torch reference ``CHUNK`` elements at a time elsewhere (it is element-wise: the same numbers). What the step
    runs per parameter (one group) or per shard; ``moeplan calibrate`` times it as the optimizer class."""
    if master.is_cuda:
        adamw_(grad, master, exp_avg, exp_avg_sq, out=out, **kwargs)
        return
    for part in zip(*(t.split(CHUNK) for t in (grad, master, exp_avg, exp_avg_sq, out))):
        adamw_ref_(*part[:4], out=part[4], **kwargs)


@dataclass(frozen=True)
class ShardedParams:
    """One main-gradient buffer set and the group its parameters are replicated (and sharded) over."""

    main_grads: MainGrads
    group: dist.ProcessGroup | None = None  # None = the default (world) group
    grad_divisor: int | None = None  # None = the group's size (the mean over replicas)
    in_norm: bool = True


@dataclass(frozen=True)
class StepStats:
    step: int  # 0-based index of the step taken
    lr: float
    grad_norm: float  # before clipping
    clip_coef: float  # 1.0 when not clipped


class _Shard:
    """This rank's part of one bucket: gradient, FP32 master weights and the two moments."""

    def __init__(self, bucket: GradBucket, group: dist.ProcessGroup | None, moment_dtype: torch.dtype) -> None:
        self.bucket, self.group = bucket, group
        self.world = dist.get_world_size(group)
        self.start, self.end = bucket.shard_range(dist.get_rank(group), self.world)
        # The reduce-scatter's output is this rank's own slice of the input (NCCL reduces in place there;
        # gloo, the CPU backend, cannot alias, so it gets a buffer of its own).
        in_place = self.world == 1 or dist.get_backend(group) == "nccl"
        self.grad = (bucket.data[self.start: self.end] if in_place else
                     torch.zeros(self.end - self.start, dtype=torch.float32, device=bucket.data.device))
        self.master = bucket.flat_params(torch.float32, self.start, self.end)
        self.exp_avg = torch.zeros_like(self.master, dtype=moment_dtype)
        self.exp_avg_sq = torch.zeros_like(self.master, dtype=moment_dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


class ZeroAdamW:
    """ZeRO-1 AdamW over one or more ``ShardedParams`` (see the module docstring)."""

    def __init__(self, sets: Sequence[ShardedParams], spec: OptimizerSpec,
                 norm_groups: Sequence[dist.ProcessGroup | None] = (None,)) -> None:
        if spec.moment_bytes not in MOMENT_DTYPES:
            raise ValueError(f"training.optimizer.moment_bytes={spec.moment_bytes}: the runtime stores moments in "
                             "2 (BF16) or 4 (FP32) bytes")
        self.sets, self.spec, self.norm_groups = tuple(sets), spec, tuple(norm_groups)
        moment_dtype = MOMENT_DTYPES[spec.moment_bytes]
        self._shards = [[_Shard(b, s.group, moment_dtype) for b in s.main_grads.buckets] for s in self.sets]
        self._pending: list = []
        self._reduced = False
        self.steps_done = 0

    def reduce_grads(self, async_op: bool = False) -> None:
        """Launch step 1 for every set (``step`` waits for it; call early to overlap it with other work)."""
        for shards in self._shards:
            for shard in shards:
                if shard.world == 1:
                    continue  # the shard is the whole buffer: nothing to reduce
                work = _reduce_scatter(shard.grad, shard.bucket.data, group=shard.group, async_op=async_op)
                if async_op:
                    self._pending.append(work)
        self._reduced = True

    def _wait_and_scale(self) -> None:
        if not self._reduced:
            self.reduce_grads()
        for work in self._pending:
            work.wait()
        self._pending.clear()
        self._reduced = False
        for s, shards in zip(self.sets, self._shards):
            for shard in shards:
                divisor = s.grad_divisor or shard.world
                if divisor != 1:
                    shard.grad.div_(divisor)

    def grad_norm(self) -> float:
        """The global norm of the reduced gradients (steps 1-2 must have run: ``step`` calls it)."""
        device = next((sh.grad.device for shards in self._shards for sh in shards), torch.device("cpu"))
        squares = squared_norm(*(shard.grad for s, shards in zip(self.sets, self._shards) if s.in_norm
                                 for shard in shards), device=device)
        for group in self.norm_groups:
            dist.all_reduce(squares, group=group)
        return math.sqrt(float(squares))  # the step's one host sync

    @torch.no_grad()
    def step(self, tokens_seen: float, mark: Callable[[str], None] | None = None) -> StepStats:
        """One optimizer step from the accumulated main gradients; zeroes them afterwards. ``mark(part)``, if
        given, is called as each part ends: ``"norm"`` (steps 1-2), ``"update"`` (3-4), ``"zero"`` (the
        simulator's parts, ``simulator.costs.optimizer_step``)."""
        mark = mark or _no_mark
        self._wait_and_scale()
        norm = self.grad_norm()
        mark("norm")
        max_norm = self.spec.grad_clip_norm
        coef = clip_coef(norm, max_norm)
        lr = self.spec.lr.lr_at(self.steps_done, tokens_seen)
        self.steps_done += 1
        for shards in self._shards:
            for shard in shards:
                self._update(shard, lr, coef)
        mark("update")
        for s in self.sets:
            s.main_grads.zero_()
        mark("zero")
        return StepStats(step=self.steps_done - 1, lr=lr, grad_norm=norm, clip_coef=coef)

    def _update(self, shard: _Shard, lr: float, coef: float) -> None:
        """Steps 3-4 for one shard: AdamW on the clipped gradient, the new weights into the parameters. On a
        group of one, each parameter's slice is updated and written straight into it; otherwise the shard is
        written in the parameters' dtype and all-gathered."""
        spec = self.spec
        kwargs = {"lr": lr, "step": self.steps_done, "beta1": spec.beta1, "beta2": spec.beta2, "eps": spec.eps,
                  "weight_decay": spec.weight_decay, "grad_scale": coef}
        bucket, start = shard.bucket, shard.start
        if shard.world == 1:
            pieces = [(lo, hi, param) for param, lo, hi in bucket.param_segments(shard.start, shard.end)]
        else:
            gathered = torch.empty(shard.end - start, dtype=bucket.param_dtype, device=bucket.data.device)
            pieces = [(start, shard.end, gathered)]
        for lo, hi, out in pieces:
            adamw_update(shard.grad[lo - start: hi - start], shard.master[lo - start: hi - start],
                   shard.exp_avg[lo - start: hi - start], shard.exp_avg_sq[lo - start: hi - start], out=out,
                   **kwargs)
        if shard.world > 1:
            flat = torch.empty(bucket.data.numel(), dtype=bucket.param_dtype, device=bucket.data.device)
            _all_gather(flat, gathered, group=shard.group)
            bucket.load_flat_params(flat)

    def state_dict(self) -> dict:
        """This rank's shard: ``{"steps_done": int, "shards": [[{master, exp_avg, exp_avg_sq}] per bucket] per set}``."""
        return {"steps_done": self.steps_done,
                "shards": [[shard.state() for shard in shards] for shards in self._shards]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()`` of the same layout (same sets, buckets and shard sizes) in place."""
        shards = state["shards"]
        if [len(s) for s in shards] != [len(s) for s in self._shards]:
            raise ValueError(f"optimizer state has buckets {[len(s) for s in shards]} per set, this optimizer "
                             f"{[len(s) for s in self._shards]}")
        for saved_set, own_set in zip(shards, self._shards):
            for saved, own in zip(saved_set, own_set):
                for name, tensor in own.state().items():
                    if saved[name].shape != tensor.shape:
                        raise ValueError(f"optimizer state {name}: shape {tuple(saved[name].shape)}, this shard "
                                         f"{tuple(tensor.shape)}")
                    tensor.copy_(saved[name])
        self.steps_done = int(state["steps_done"])
