"""Plotly figures of a placement: expert -> GPU heatmap and GPU x GPU dispatch traffic. Pure: they return
figures; the CLI writes them as self-contained HTML (plotly.js inlined, no CDN)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moeplan.simulator.placement.maps import Placement, slot_load
from moeplan.simulator.traffic.all_to_all import LayerTraffic, dispatch_bytes_per_token

MB = 1e6  # display unit


def expert_gpu_load(placement: Placement, weight: np.ndarray, row: int) -> np.ndarray:
    """``[experts, gpus]`` load each GPU serves for each expert in layer ``row`` (0 where not placed)."""
    loads = np.zeros((placement.num_logical_experts, placement.num_gpus))
    per_slot = slot_load(placement, weight)[row]
    np.add.at(loads, (placement.phy2log[row], placement.gpu_of_slot), per_slot)
    return loads


def placement_figure(
    placements: dict[str, Placement], weight: np.ndarray, row: int, layer_id: int
) -> go.Figure:
    """One heatmap per placement (e.g. "before", "after"): experts down, GPUs across, colour = load."""
    matrices = {}
    for name, placement in placements.items():
        z = expert_gpu_load(placement, weight, row)
        matrices[name] = np.where(z > 0, z, np.nan)
    return _side_by_side(
        matrices, "expert %{y}<br>GPU %{x}<br>load %{z:.4g}", ("GPU", "logical expert"), "Viridis",
        f"Expert -> GPU placement, layer {layer_id} (colour: tokens served)",
    )


def traffic_figure(traffics: dict[str, LayerTraffic], hidden_size: int, layer_id: int) -> go.Figure:
    """GPU x GPU dispatch bytes (NVLink + IB, MB), one heatmap per placement."""
    bytes_per_token = dispatch_bytes_per_token(hidden_size)
    matrices = {name: (t.nvlink_tokens + t.ib_tokens) * bytes_per_token / MB for name, t in traffics.items()}
    return _side_by_side(
        matrices, "from GPU %{y}<br>to GPU %{x}<br>%{z:.3g} MB", ("receiver GPU", "sender GPU"), "Blues",
        f"Dispatch traffic, layer {layer_id} (MB per forward, FP8; combine is the transpose in BF16)",
    )


def _side_by_side(
    matrices: dict[str, np.ndarray], hover: str, axis_titles: tuple[str, str], colorscale: str, title: str
) -> go.Figure:
    """Heatmaps in one row sharing a colour axis, one per named matrix."""
    names = list(matrices)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        trace = go.Heatmap(z=matrices[name], coloraxis="coloraxis", hovertemplate=hover + f"<extra>{name}</extra>")
        fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(title_text=axis_titles[0], row=1, col=col)
    fig.update_yaxes(title_text=axis_titles[1], autorange="reversed", row=1, col=1)
    fig.update_layout(title=title, coloraxis={"colorscale": colorscale}, height=700)
    return fig
