"""FP32 main gradients (DeepSeek-V3 TR §3.3: FP32 gradient accumulation beside BF16 weights).

``attach_main_grads(params, pad_multiple)`` lays a stage's parameters out in flat FP32 buffers, one
per (parameter dtype, device) bucket, in parameter order, each padded to a multiple of
``pad_multiple`` elements (the data-parallel group size) so that a reduce-scatter gives every rank an
equal shard. Every parameter gets ``param.main_grad``, a view of its slice. From then on:

- the model's weight-gradient paths (``model.weight_grad.accumulate_grad``: the W step of
  ``LinearFn`` / ``GroupedLinearFn`` behind a ``WeightGradStore``) add into ``main_grad`` in FP32;
- every gradient autograd accumulates (fused I+W matmuls, norms, router, embedding) lands in
  ``param.grad`` in the parameter dtype for one backward only: a post-accumulate-grad hook adds it
  into ``main_grad`` and frees ``param.grad``, so micro-batches never sum in BF16.

Nothing is global: ``MainGrads.detach()`` removes the hooks and the views.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GradBucket:
    """One flat FP32 buffer: parameters of one dtype and device, in order, then zero padding.

    ``data`` (padded,) FP32; parameter i occupies ``data[offsets[i] : offsets[i] + params[i].numel()]``.
    """

    params: tuple[nn.Parameter, ...]
    offsets: tuple[int, ...]
    numel: int  # without the padding
    data: torch.Tensor

    @property
    def param_dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def shard_range(self, rank: int, world: int) -> tuple[int, int]:
        """[start, end) of rank's equal shard of ``data`` over ``world`` ranks."""
        size = self.data.numel() // world
        assert size * world == self.data.numel(), f"{self.data.numel()=} {world=}: pad_multiple must be the group size"
        return rank * size, (rank + 1) * size

    def param_segments(self, start: int, end: int):
        """(the parameter's flat view over [lo, hi), lo, hi) for each parameter that meets [start, end) of the
        bucket layout; padding belongs to none."""
        for p, off in zip(self.params, self.offsets):
            lo, hi = max(start, off), min(end, off + p.numel())
            if lo < hi:
                yield p.detach().view(-1)[lo - off: hi - off], lo, hi  # view: a write reaches p

    def flat_params(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the parameters in the bucket layout, as ``dtype``, padding zero (the whole
        padded bucket by default); only that range is allocated."""
        end = self.data.numel() if end is None else end
        flat = torch.zeros(end - start, dtype=dtype, device=self.data.device)
        for part, lo, hi in self.param_segments(start, end):
            flat[lo - start: hi - start].copy_(part)
        return flat

    @torch.no_grad()
    def load_flat_params(self, flat: torch.Tensor, start: int = 0) -> None:
        """Copy ``flat``, elements [start, start + len) of the bucket layout, into the parameters it covers
        (cast to their dtype on the way; no full-size temporary)."""
        for part, lo, hi in self.param_segments(start, start + flat.numel()):
            part.copy_(flat[lo - start: hi - start])


class MainGrads:
    """The FP32 main-gradient buckets of a set of parameters, and the hooks that fill them."""

    def __init__(self, buckets: tuple[GradBucket, ...], handles: list) -> None:
        self.buckets = buckets
        self._handles = handles

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        return tuple(p for b in self.buckets for p in b.params)

    @classmethod
    def join(cls, *parts: MainGrads) -> MainGrads:
        """One set over several attached sets' buckets (and hooks): what the runtime zeroes and syncs."""
        return cls(tuple(b for part in parts for b in part.buckets), [h for part in parts for h in part._handles])

    def zero_(self) -> None:
        for bucket in self.buckets:
            bucket.data.zero_()

    def detach(self) -> None:
        """Back to plain ``param.grad`` accumulation: hooks removed, ``main_grad`` views dropped."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self.params:
            del p.main_grad


def _add_into_main_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: this backward's ``param.grad`` joins the FP32 sum, then is freed (None
    where the weight gradient was deferred to a ``WeightGradStore``, whose flush adds it itself)."""
    if param.grad is None:
        return
    param.main_grad.add_(param.grad.view_as(param.main_grad))
    param.grad = None


def attach_main_grads(params: nn.Module | Iterable[nn.Parameter], pad_multiple: int = 1) -> MainGrads:
    """Give every trainable parameter of ``params`` an FP32 ``main_grad`` view into a flat bucket.

    ``pad_multiple``: each bucket's length is rounded up to a multiple of it (the size of the group that
    will reduce-scatter the bucket). Parameters that do not require grad are skipped; a parameter given
    twice (tied weights) is laid out once. Raises ``ValueError`` if one already has a ``main_grad``.
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple={pad_multiple} must be >= 1")
    plist = params.parameters() if isinstance(params, nn.Module) else params
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in plist:
        if not p.requires_grad or id(p) in seen:
            continue
        if hasattr(p, "main_grad"):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} already has a main_grad (attached twice?)")
        seen.add(id(p))
        groups.setdefault((p.dtype, p.device), []).append(p)
    buckets, handles = [], []
    for (_, device), members in groups.items():
        offsets, total = [], 0
        for p in members:
            offsets.append(total)
            total += p.numel()
        padded = -(-total // pad_multiple) * pad_multiple
        data = torch.zeros(padded, dtype=torch.float32, device=device)
        for p, off in zip(members, offsets):
            p.main_grad = data[off: off + p.numel()].view(p.shape)
            handles.append(p.register_post_accumulate_grad_hook(_add_into_main_grad))
        buckets.append(GradBucket(params=tuple(members), offsets=tuple(offsets), numel=total, data=data))
    return MainGrads(tuple(buckets), handles)
