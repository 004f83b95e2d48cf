"""Training recipes: the training spec, budget and (where published) parallel layout of a run.

``deepseek-v3``: DeepSeek-V3 TR §3.1-3.3, §4.1-4.3 and Table 1 (``shared/reference/deepseek-v3.md``
§2, §8, §9): 14.8T tokens at 4K with the batch ramped 3072 -> 15360 sequences over the first 469B
tokens; two YaRN context-extension phases of 1000 steps (32K x 1920, then 128K x 480); FP8
training; PP16 DualPipe, EP64 inside ZeRO-1 DP; recompute of RMSNorm, MLA up-projections and
SwiGLU; memory-bound kernels fused as DeepSeek's stack runs them (permutation and combine inside
DeepEP's all-to-all, FP8 cast with transpose, SwiGLU writing FP8: TR §3.3, §3.5.2) and a fused
cross-entropy (not published; ``spec.training.KernelSpec``, ``costs.elementwise``); 2,788K H800
GPU-hours at $2 (Table 1's total, which includes 5K of post-training we do not model). AdamW (TR
§4.2, reference §8): betas 0.9 / 0.95, weight decay 0.1, clipping at 1.0, the LR schedule of
``spec.hyperparams.deepseek_v3_lr``; gamma and lambda of ``deepseek_v3_balance`` (TR §2.1.2, §4.2,
reference §3).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.spec.hyperparams import deepseek_v3_balance, deepseek_v3_lr, warmup_cosine_lr
from moeplan.simulator.spec.parallel import ParallelSpec
from moeplan.simulator.spec.training import BatchRamp, BudgetSpec, KernelSpec, OptimizerSpec, Phase, TrainingSpec


@dataclass(frozen=True)
class Recipe:
    training: TrainingSpec
    budget: BudgetSpec
    parallel: ParallelSpec | None  # the published layout, or None to derive one


def deepseek_v3_recipe() -> Recipe:
    training = TrainingSpec(
        phases=(
            Phase(
                name="pretrain", tokens=14.8e12, global_batch_seqs=15360,
                ramp=BatchRamp(start_seqs=3072, ramp_tokens=469e9),
            ),
            Phase(name="context-32k", steps=1000, seq_len_tokens=32768, global_batch_seqs=1920),
            Phase(name="context-128k", steps=1000, seq_len_tokens=131072, global_batch_seqs=480),
        ),
        precision="fp8",
        kernels=KernelSpec(fusion="fused", loss="fused"),
        optimizer=OptimizerSpec(lr=deepseek_v3_lr(), beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip_norm=1.0),
        balance=deepseek_v3_balance(),
    )
    parallel = ParallelSpec(
        pp=16, ep=64, schedule="dualpipe", micro_batch_size=1, seq_len_tokens=4096,
        recompute="selective", zero_stage=1,
    )
    return Recipe(training=training, budget=BudgetSpec(gpu_hours=2.788e6, usd_per_gpu_hour=2.0), parallel=parallel)


def default_recipe() -> Recipe:
    """For models without a published recipe: 1T tokens at 4K, 4096-sequence batches, BF16,
    no budget; `moeplan plan` searches the layout (``simulator.search``). AdamW as V3's, with a plain
    schedule: 2,000 warmup steps to 3e-4, cosine to 3e-5 at 1T tokens (the run's end); gamma 0.001 and
    MTP weight 0.3 throughout (``BalanceSpec``'s defaults)."""
    optimizer = OptimizerSpec(lr=warmup_cosine_lr(peak_lr=3e-4, floor_lr=3e-5, warmup_steps=2000, decay_tokens=1e12))
    training = TrainingSpec(phases=(Phase(name="pretrain", tokens=1e12, global_batch_seqs=4096),), precision="bf16",
                            optimizer=optimizer)
    return Recipe(training=training, budget=BudgetSpec(), parallel=None)


RECIPES = {"deepseek-v3": deepseek_v3_recipe}


def recipe_for(model_name: str) -> Recipe:
    return RECIPES.get(model_name, default_recipe)()
