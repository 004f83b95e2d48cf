"""DeepSeek-V3 in PyTorch, built from ``simulator.spec.model.ModelSpec``.

Public API:
- ``from_hf_config(path_or_dict, options=None, generator=None, device=None) -> Transformer``
- ``load_hf_state_dict(module, state_dict, strict=True) -> LoadReport``
- ``Transformer`` (forward(input_ids) -> ``ModelOutput`` with ``.logits``), ``ModelOptions``,
  ``StageSpec`` / ``rank_stages_from_plan`` / ``build_rank`` for pipeline stages (read from the plan
  file), ``WeightGradStore`` for I/W splitting, ``training_loss``, ``ExpertBiasUpdater``
  (aux-loss-free balancing).
May import: ``kernels`` and the data-only ``simulator.spec`` and ``simulator.contracts``. See docs/design/model.md.
"""

from moeplan.model.api import from_hf_config
from moeplan.model.balance import BalanceSchedule, ExpertBiasUpdater
from moeplan.model.hf_weights import load_hf_state_dict
from moeplan.model.losses import training_loss
from moeplan.model.options import ModelOptions
from moeplan.model.stage import StageSpec, rank_stages_from_plan, stages_from_plan
from moeplan.model.transformer import ModelOutput, Transformer, build_rank
from moeplan.model.weight_grad import WeightGradStore, attach_weight_grad_store

__all__ = [
    "BalanceSchedule", "ExpertBiasUpdater", "ModelOptions", "ModelOutput", "StageSpec", "Transformer",
    "WeightGradStore", "attach_weight_grad_store", "build_rank", "from_hf_config", "load_hf_state_dict",
    "rank_stages_from_plan", "stages_from_plan", "training_loss",
]
