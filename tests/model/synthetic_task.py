"""A synthetic next-token task for training the tiny model on CPU, and its training loop.

Task: a fixed random permutation ``perm`` of the vocabulary; each sequence starts at a random token
and follows t_{i+1} = perm[t_i]. The next token (and the one after, for MTP) is a deterministic
function of the current one, so a working model drives both losses towards 0 from ln(V).
Token frequencies are skewed (start tokens drawn from a Zipf law over a short chain), which gives
the router an uneven load to balance.

Run ``python -m tests.model.synthetic_task`` for the figures quoted in docs/design/model.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplan.model import BalanceSchedule, ExpertBiasUpdater, ModelOptions, Transformer, training_loss
from moeplan.model.balance import max_over_mean
from moeplan.simulator.presets.models import tiny_moe
from moeplan.simulator.spec.hyperparams import BalanceSpec, TokenSteps
from moeplan.simulator.spec.model import ModelSpec


def task_spec() -> ModelSpec:
    return ModelSpec.model_validate(
        {**tiny_moe().model_dump(), "vocab_size": 64, "num_hidden_layers": 2, "name": "tiny-moe-synthetic"}
    )


def make_batch(perm: torch.Tensor, batch: int, seqlen: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (B, T); labels[:, i] = input_ids[:, i+1] continued by one step."""
    vocab = perm.numel()
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.2
    start = torch.multinomial(zipf, batch, replacement=True, generator=gen)  # (B,)
    seq = [start]
    for _ in range(seqlen):
        seq.append(perm[seq[-1]])
    tokens = torch.stack(seq, dim=1)  # (B, T+1)
    return tokens[:, :-1], tokens[:, 1:]


@dataclass(frozen=True)
class TrainResult:
    first_loss: float
    final_loss: float  # mean LM loss over the last 20 steps
    final_mtp_loss: float
    max_over_mean: float  # per-step expert load max/mean, averaged over MoE layers and the last 50 steps
    window_max_over_mean: float  # max/mean of the loads summed over the last 50 steps, mean over layers
    run_max_over_mean: float  # max/mean of the loads summed over the whole run, mean over layers


def train(steps: int, gamma: float, seed: int = 0, batch: int = 16, seqlen: int = 32, lr: float = 3e-3) -> TrainResult:
    """AdamW on the synthetic task; ``gamma`` = bias update speed (0 disables aux-loss-free balancing)."""
    torch.manual_seed(seed)  # SDPA / dropout-free, but keep any global-RNG use deterministic
    spec = task_spec()
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(spec, ModelOptions(dtype=torch.float32))
    model.init_weights(gen)
    perm = torch.randperm(spec.vocab_size, generator=gen)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    balancer = ExpertBiasUpdater(model.moe_layers())
    schedule = BalanceSchedule(BalanceSpec(bias_update_speed=TokenSteps(values=(gamma,))))
    lm_hist, mtp_hist, imbalance, window, run = [], [], [], {}, {}
    for step in range(steps):
        ids, labels = make_batch(perm, batch, seqlen, gen)
        loss = training_loss(model(ids), labels, mtp_weight=schedule.mtp_weight(step * batch * seqlen))
        optim.zero_grad(set_to_none=True)
        loss.total.backward()
        optim.step()
        loads = balancer.step(schedule.gamma(step * batch * seqlen))
        lm_hist.append(loss.lm.item())
        mtp_hist.append(loss.mtp.item())
        run = {k: run.get(k, 0) + v for k, v in loads.items()}
        if step >= steps - 50:
            imbalance.append(sum(max_over_mean(v) for v in loads.values()) / len(loads))
            window = {k: window.get(k, 0) + v for k, v in loads.items()}
    return TrainResult(first_loss=lm_hist[0], final_loss=sum(lm_hist[-20:]) / 20,
                       final_mtp_loss=sum(mtp_hist[-20:]) / 20, max_over_mean=sum(imbalance) / len(imbalance),
                       window_max_over_mean=sum(max_over_mean(v) for v in window.values()) / len(window),
                       run_max_over_mean=sum(max_over_mean(v) for v in run.values()) / len(run))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    for gamma in args.gamma:
        print(f"steps={args.steps} batch={args.batch} gamma={gamma}:", train(args.steps, gamma, batch=args.batch), flush=True)
