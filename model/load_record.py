"""Expert-load files: the per-layer, per-expert routed-token counts a training run measures, written as
the one expert-load schema (``ExpertLoadRecord`` in ``simulator.contracts.expert_load``) that the
placement planner reads (``moeplan placement --load``, ``moeplan plan --load``).

The contract module is plain data (pydantic and numpy); it loads neither the engine nor SimPy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.contracts.expert_load import ExpertLoadRecord, LayerLoad


class LoadAccumulator:
    """Sums per-layer loads over a window of steps."""

    def __init__(self) -> None:
        self.totals: dict[int, torch.Tensor] = {}
        self.step_start: int | None = None
        self.step_end = 0

    def add(self, step: int, loads: dict[int, torch.Tensor]) -> None:
        for layer, load in loads.items():
            self.totals[layer] = self.totals.get(layer, torch.zeros_like(load, device="cpu")) + load.cpu()
        self.step_start = step if self.step_start is None else self.step_start
        self.step_end = step


def load_record(model_name: str, loads: dict[int, torch.Tensor], top_k: int, step_start: int = 0,
                step_end: int = 0) -> ExpertLoadRecord:
    """The record for ``{layer_id: (E,) counts}``; ``window_tokens`` = one layer's sum / k."""
    if not loads:
        raise ValueError("loads is empty: no MoE layer was counted")
    layers = sorted(loads)
    sizes = {int(loads[layer].numel()) for layer in layers}
    if len(sizes) != 1:
        raise ValueError(f"layers have different expert counts {sorted(sizes)}")
    window_tokens = int(loads[layers[0]].sum()) // top_k
    return ExpertLoadRecord(
        model=model_name, n_routed_experts=sizes.pop(), num_experts_per_tok=top_k,
        window_tokens=max(window_tokens, 1), step_start=step_start, step_end=step_end,
        layers=[LayerLoad(layer=layer, tokens_per_expert=[int(c) for c in loads[layer].tolist()]) for layer in layers],
    )


def write_load_file(path: str | Path, record: ExpertLoadRecord) -> None:
    """Write atomically (temporary file, then rename), so readers never see half a file."""
    write_atomic(path, record.model_dump_json(indent=1) + "\n")
