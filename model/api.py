"""``from_hf_config``: a HF ``config.json`` (path, directory or dict) -> a ``Transformer``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moeplan.model.options import ModelOptions
from moeplan.model.transformer import Transformer
from moeplan.simulator.spec.model import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_INIT_SEED = 0


def from_hf_config(
    path_or_dict: str | Path | dict[str, Any],
    options: ModelOptions | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """Build the model a DeepSeek-V3/V2 ``config.json`` describes (BF16 unless ``options`` say otherwise).

    Weights are initialised N(0, initializer_range) from ``generator`` (default: seed
    ``DEFAULT_INIT_SEED``); on the ``meta`` device nothing is initialised. Load real weights with
    ``load_hf_state_dict``.
    """
    if isinstance(path_or_dict, dict):
        spec, ignored = ModelSpec.from_hf_config(path_or_dict)
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"config path {path} does not exist")
        spec, ignored = ModelSpec.from_hf_config_file(path)
    if ignored:
        logger.info("config keys not modelled: %s", ", ".join(ignored))
    with torch.device(device or "cpu"):
        module = Transformer(spec, options)
    if torch.device(device or "cpu").type != "meta":
        module.init_weights(generator or torch.Generator().manual_seed(DEFAULT_INIT_SEED))
    return module
