"""Expert-load files: per-layer, per-expert routed-token counts, in the versioned JSON format of
``simulator/contracts/expert_load.py`` (``ExpertLoadRecord``, schema_version 1), which the placement
planner reads. Written here without importing the simulator (``model`` depends only on
``simulator.spec``); tests validate the output against the simulator's schema.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

LOAD_SCHEMA_VERSION = 1


class LoadAccumulator:
    """Sums per-layer loads over a window of steps."""

    def __init__(self) -> None:
        self.totals: dict[int, torch.Tensor] = {}
        self.step_start: int | None = None
        self.step_end = 0

    def add(self, step: int, loads: dict[int, torch.Tensor]) -> None:
        for layer, load in loads.items():
            self.totals[layer] = self.totals.get(layer, torch.zeros_like(load)) + load.cpu()
        self.step_start = step if self.step_start is None else self.step_start
        self.step_end = step


def load_record(model_name: str, loads: dict[int, torch.Tensor], top_k: int, step_start: int = 0,
                step_end: int = 0) -> dict:
    """The JSON-ready record for ``{layer_id: (E,) counts}``; ``window_tokens`` = one layer's sum / k."""
    if not loads:
        raise ValueError("loads is empty: no MoE layer was counted")
    layers = sorted(loads)
    sizes = {int(loads[layer].numel()) for layer in layers}
    if len(sizes) != 1:
        raise ValueError(f"layers have different expert counts {sorted(sizes)}")
    window_tokens = int(loads[layers[0]].sum()) // top_k
    return {
        "schema_version": LOAD_SCHEMA_VERSION,
        "model": model_name,
        "n_routed_experts": sizes.pop(),
        "num_experts_per_tok": top_k,
        "window_tokens": max(window_tokens, 1),
        "step_start": step_start,
        "step_end": step_end,
        "layers": [{"layer": layer, "tokens_per_expert": [int(c) for c in loads[layer].tolist()]}
                   for layer in layers],
    }


def write_load_file(path: str | Path, record: dict) -> None:
    """Write atomically (temporary file, then rename), so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
