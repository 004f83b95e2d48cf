"""The routed experts' fused FP8 path (``model.fused_experts``, ``fp8_kernel="kernels"``) against the unfused
reference FP8 path (``fp8_kernel="reference"``: quantise-dequantise, then FP32 matmuls), forward and backward.

Both round at the same points (the down projection quantises the FP32 SwiGLU product, outputs and
gradients in the activation dtype, pairs summed in FP32), so on the interpreter they agree to the FP32
summation order; on a GPU the tensor-core partial sums differ, and a flipped BF16 rounding before an E4M3
rounding moves one element by an E4M3 step. Tiny shapes here (the interpreter); V3 shapes on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moeplan.kernels.moe_permute import make_pair_plan
from moeplan.model import fused_experts
from moeplan.model.experts import GroupedExperts
from moeplan.model.fp8 import kernel_ops, reference_ops
from moeplan.model.fused_experts import FusedExpertsFn
from moeplan.model.weight_grad import WeightGradStore
from tests.kernels import test_kernels
from tests.kernels.test_kernels import ON_GPU, rand, rel_err
from tests.kernels.test_moe_permute_bound import untouched

# the kernels tests' fixtures: the device (the GPU, else the interpreter) and NaN-poisoned outputs (autouse)
device, poisoned = test_kernels.device, test_kernels.poisoned

# Fused against the reference FP8 path. Measured on the interpreter: <= 2e-5 with the FP8 backward, 1.5e-4 (dx)
# straight-through (BF16 matmul partial sums in another order flip a few BF16 roundings). One misplaced
# rounding before an E4M3 cast (quantising the BF16 SwiGLU output, say) gives ~1e-2.
TOL_FUSED = 1e-2 if ON_GPU else 1e-3


def _experts(ops, fp8_backward: bool, num_experts: int, dim: int, inter: int, device: str) -> GroupedExperts:
    experts = GroupedExperts(num_experts, dim, inter, torch.bfloat16, backend="fp8", fp8=ops,
                             fp8_backward=fp8_backward).to(device)
    with torch.no_grad():
        experts.gate_up_proj.copy_(rand(num_experts, 2 * inter, dim, seed=31, device=device, scale=dim ** -0.5))
        experts.down_proj.copy_(rand(num_experts, dim, inter, seed=32, device=device, scale=inter ** -0.5))
    return experts


def _run(experts: GroupedExperts, x0, pairs, dy, store: WeightGradStore | None = None):
    """out, then the gradients of x, the pair weights, gate_up and down (W flushed from ``store`` if given)."""
    token_of_pair, expert_of_pair, weight0 = pairs
    x = x0.clone().requires_grad_(True)
    weight = weight0.clone().requires_grad_(True)
    experts.weight_grad_store = store
    out, counts = experts.forward_pairs(x, token_of_pair, expert_of_pair, weight)
    out.backward(dy)
    if store is not None:
        assert experts.gate_up_proj.grad is None and store.flush() == 2  # both Wgrads were deferred
    assert torch.equal(counts.cpu(), torch.bincount(expert_of_pair.cpu(), minlength=experts.num_experts))
    return out.grad_fn, (out, x.grad, weight.grad, experts.gate_up_proj.grad, experts.down_proj.grad)


def _ragged_pairs(num_tokens: int, num_experts: int, device: str):
    """Pairs as expert parallelism hands them over: 0 to 3 per row, in no particular order, expert 1 unused."""
    g = torch.Generator().manual_seed(33)
    per_row = torch.randint(0, 4, (num_tokens,), generator=g)
    token = torch.arange(num_tokens).repeat_interleave(per_row)
    token = token[torch.randperm(token.numel(), generator=g)]
    expert = torch.tensor([0, 2, 3])[torch.randint(0, 3, (token.numel(),), generator=g)]
    weight = torch.rand(token.numel(), generator=g)
    return token.to(device), expert.to(device), weight.to(device)


def test_fused_fp8_experts_equal_the_reference_path_ragged_pairs_and_deferred_w(device):
    """FP8 backward, ragged pairs (rows with none, one expert with none), Wgrads queued on a store."""
    E, d, inter, n = (4, 128, 128, 24) if not ON_GPU else (32, 7168, 2048, 4096)
    pairs = _ragged_pairs(n, E, device)
    x0 = rand(n, d, seed=34, device=device, dtype=torch.bfloat16)
    dy = rand(n, d, seed=35, device=device, dtype=torch.bfloat16)
    fn, fused = _run(_experts(kernel_ops(), True, E, d, inter, device), x0, pairs, dy, WeightGradStore())
    assert type(fn).__name__ == "FusedExpertsFnBackward"  # the fused path ran
    _, ref = _run(_experts(reference_ops(128), True, E, d, inter, device), x0, pairs, dy)
    for name, got, want in zip(("out", "dx", "dweight", "dgate_up", "ddown"), fused, ref):
        assert rel_err(got, want) < TOL_FUSED, name
    rows_without_pairs = torch.bincount(pairs[0], minlength=n) == 0
    assert rows_without_pairs.any() and not fused[0][rows_without_pairs].any()


@pytest.mark.parametrize("fp8_backward", [False] + ([True] if ON_GPU else []))
def test_fused_fp8_experts_equal_the_reference_path_top_k(device, fp8_backward):
    """``forward`` with (N, k) routing; the straight-through backward (float Dgrad and Wgrad) too."""
    E, d, inter, n, k = (3, 128, 256, 16, 2) if not ON_GPU else (32, 7168, 2048, 4096, 8)
    g = torch.Generator().manual_seed(36)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]).to(device)
    weights = torch.rand(n, k, generator=g).to(device)
    x0 = rand(n, d, seed=37, device=device, dtype=torch.bfloat16)
    dy = rand(n, d, seed=38, device=device, dtype=torch.bfloat16)
    results = []
    for ops in (kernel_ops(), reference_ops(128)):
        experts = _experts(ops, fp8_backward, E, d, inter, device)
        x, w = x0.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out, _ = experts(x, indices, w)
        out.backward(dy)
        results.append((out, x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
    for name, got, want in zip(("out", "dx", "dweight", "dgate_up", "ddown"), *results):
        assert rel_err(got, want) < TOL_FUSED, name


@pytest.mark.parametrize("fp8_backward", [True, False])
def test_fused_fp8_experts_without_host_counts_equal_the_exact_layout(device, fp8_backward):
    """``host_counts=False``: no counts on the host, the plan at its worst-case size (the rows after the last
    segment padding) and the GEMMs reading the experts on the device; the same results as the exact layout."""
    E, d, inter, n = (4, 128, 128, 24) if not ON_GPU else (32, 7168, 2048, 4096)
    pairs = _ragged_pairs(n, E, device)
    x0 = rand(n, d, seed=34, device=device, dtype=torch.bfloat16)
    dy = rand(n, d, seed=35, device=device, dtype=torch.bfloat16)
    results = []
    for on_host in (True, False):
        experts = _experts(kernel_ops(), fp8_backward, E, d, inter, device)
        experts.host_counts = on_host
        assert experts.counts_on_host(torch.device(device)) is on_host
        fn, got = _run(experts, x0, pairs, dy)
        assert type(fn).__name__ == "FusedExpertsFnBackward"
        results.append(got)
    for name, got, want in zip(("out", "dx", "dweight", "dgate_up", "ddown"), *results[::-1]):
        assert rel_err(got, want) < (TOL_FUSED if ON_GPU else 1e-6), name


@pytest.mark.parametrize("fp8_backward", [True, False])
def test_fused_fp8_experts_equal_with_and_without_the_row_bound(device, fp8_backward):
    """A worst-case plan (experts 1, 4 and 5 of 6 unused on the CPU: half its rows after the last segment) run with
    its row bound and without it (every memory-bound kernel then writes the tail): the same bits, forward and
    backward, FP8 or straight-through."""
    E, d, inter, n = (6, 128, 128, 24) if not ON_GPU else (32, 7168, 2048, 4096)
    token_of_pair, expert_of_pair, weight0 = _ragged_pairs(n, E, device)
    plan = make_pair_plan(token_of_pair, expert_of_pair, n, E)
    assert plan.rows_bound is not None and int(plan.rows_bound) < plan.num_rows
    x0 = rand(n, d, seed=34, device=device, dtype=torch.bfloat16)
    dy = rand(n, d, seed=35, device=device, dtype=torch.bfloat16)
    experts = _experts(kernel_ops(), fp8_backward, E, d, inter, device)
    results = []
    for p in (plan, replace(plan, rows_bound=None)):
        x, weight = x0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        gate_up, down = (w.detach().clone().requires_grad_(True) for w in (experts.gate_up_proj, experts.down_proj))
        out = FusedExpertsFn.apply(x, weight, gate_up, down, p, experts.fp8, fp8_backward, None, None, x.is_cuda)
        out.backward(dy)
        results.append((out, x.grad, weight.grad, gate_up.grad, down.grad))
    for name, got, want in zip(("out", "dx", "dweight", "dgate_up", "ddown"), *results):
        assert rel_err(got, want) < 1 and torch.equal(got, want), name  # rel_err: finite, nothing left poisoned


def _with_and_without(device, field: str, spied: str, seeds: tuple[int, int]) -> list[int]:
    """The FP8 backward of a worst-case plan with the ops' ``field`` and with it None: the same bits, forward and
    backward (asserted); returns how often each run called ``fused_experts``'s ``spied`` function."""
    from moeplan.model import fused_experts

    E, d, inter, n = (6, 128, 128, 24) if not ON_GPU else (32, 7168, 2048, 4096)
    token_of_pair, expert_of_pair, weight0 = _ragged_pairs(n, E, device)
    plan = make_pair_plan(token_of_pair, expert_of_pair, n, E)
    x0 = rand(n, d, seed=seeds[0], device=device, dtype=torch.bfloat16)
    dy = rand(n, d, seed=seeds[1], device=device, dtype=torch.bfloat16)
    results, counts = [], []
    for ops in (kernel_ops(), replace(kernel_ops(), **{field: None})):
        experts = _experts(ops, True, E, d, inter, device)
        calls = []
        with pytest.MonkeyPatch.context() as spy:
            spy.setattr(fused_experts, spied,
                        lambda *a, _f=getattr(fused_experts, spied), _c=calls, **k: _c.append(1) or _f(*a, **k))
            x, weight = x0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
            gate_up, down = (w.detach().clone().requires_grad_(True)
                             for w in (experts.gate_up_proj, experts.down_proj))
            out = FusedExpertsFn.apply(x, weight, gate_up, down, plan, experts.fp8, True, None, None, x.is_cuda)
            out.backward(dy)
        results.append((out, x.grad, weight.grad, gate_up.grad, down.grad))
        counts.append(len(calls))
    for name, got, want in zip(("out", "dx", "dweight", "dgate_up", "ddown"), *results):
        assert rel_err(got, want) < 1 and torch.equal(got, want), name
    return counts


def test_the_combines_backward_quantised_as_it_permutes_gives_the_same_bits(device, monkeypatch):
    """The FP8 backward with the ops' ``permute_quant_both`` (the combine's backward gathered straight into both
    tilings; on a Hopper GPU the Gluon gather, ``moe_permute.PERMUTE_BOTH``) and without it (the permute, then
    ``quant_act_both``): the same bits, forward and backward, on a worst-case plan; and only the path with it
    leaves the permuted gradient unstored (``moe_permute`` called once fewer)."""
    from moeplan.kernels import moe_permute as mp

    with monkeypatch.context() as m:
        m.setattr(mp, "PERMUTE_BOTH", ON_GPU)
        permutes = _with_and_without(device, "permute_quant_both", "moe_permute", (34, 35))
    assert permutes == [2, 3], permutes  # forward and gate_up's Wgrad input; without: the combine's backward too


def test_swiglus_backward_quantised_as_it_is_computed_gives_the_same_bits(device, monkeypatch):
    """The FP8 backward with the ops' ``swiglu_backward_quant_both`` (d h computed and quantised both ways in one
    pass; on a Hopper GPU the Gluon kernel, ``swiglu.BACKWARD_BOTH``) and without it (``swiglu_backward``, then
    ``quant_act_both``): the same bits, forward and backward, on a worst-case plan; only the path without it calls
    ``swiglu_backward`` (d h stored in BF16)."""
    from moeplan.kernels import swiglu as sw

    with monkeypatch.context() as m:
        m.setattr(sw, "BACKWARD_BOTH", ON_GPU)
        backwards = _with_and_without(device, "swiglu_backward_quant_both", "swiglu_backward", (36, 37))
    assert backwards == [0, 1], backwards


# What each spied function returns: (name, transposed), transposed: the rows of the layout are its columns.
_SPIED = {"moe_permute": False, "swiglu": False, "swiglu_quant_t": True, "swiglu_backward": False}


def test_fused_fp8_experts_leave_every_tail_unwritten(device, monkeypatch):
    """Without host counts, every output of the layer's memory-bound kernels (permute, SwiGLU forward, 128x1_t and
    backward, the quantisers of the gradients) keeps its poison from the plan's row bound on and has none before
    it: the kernels stop at the bound, and what the layer returns (checked finite) never read past it."""
    E, d, inter, n = (6, 128, 128, 24) if not ON_GPU else (32, 7168, 2048, 4096)
    pairs = _ragged_pairs(n, E, device)
    counts = torch.bincount(pairs[1].cpu(), minlength=E).tolist()
    bound = sum(-(-c // 128) * 128 for c in counts)
    calls = []

    def spy(name, fn, transposed):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append((name, out, transposed or kwargs.get("quantize") == "128x1_t"))
            return out
        return run

    for name, transposed in _SPIED.items():
        monkeypatch.setattr(fused_experts, name, spy(name, getattr(fused_experts, name), transposed))
    ops = kernel_ops()
    ops = replace(ops, quant_act=spy("quant_act", ops.quant_act, False),
                  quant_act_t=spy("quant_act_t", ops.quant_act_t, True),
                  quant_act_both=spy("quant_act_both", ops.quant_act_both, None),
                  permute_quant_both=spy("permute_quant_both", ops.permute_quant_both, None),
                  swiglu_backward_quant_both=spy("swiglu_backward_quant_both", ops.swiglu_backward_quant_both, None))
    experts = _experts(ops, True, E, d, inter, device)
    experts.host_counts = False
    _, got = _run(experts, rand(n, d, seed=34, device=device, dtype=torch.bfloat16), pairs,
                  rand(n, d, seed=35, device=device, dtype=torch.bfloat16))
    assert all(torch.isfinite(g).all() for g in got)  # nothing past the bound reached the results
    names = sorted(name for name, *_ in calls)
    # permute: forward and gate_up's Wgrad input; the combine's backward quantised as it permutes; SwiGLU's
    # gradient quantised both ways as it is computed
    assert names == sorted(["moe_permute"] * 2 + ["swiglu", "swiglu_quant_t"]
                           + ["permute_quant_both", "swiglu_backward_quant_both"]), names
    num_rows = calls[0][1][0].shape[0]
    assert bound < num_rows
    for name, out, transposed in calls:
        parts = [(out, transposed)] if isinstance(out, torch.Tensor) else [(t, transposed) for t in out]
        if name in ("quant_act_both", "permute_quant_both", "swiglu_backward_quant_both"):  # ((values, scales) 1x128,
            # (same) 128x1 transposed)
            parts = [(t, False) for t in out[0]] + [(t, True) for t in out[1]]
        for t, t_transposed in parts:
            rows = t.t() if t_transposed else t  # (rows, ...) or (tiles of 128 rows, ...)
            edge = bound if rows.shape[0] == num_rows else bound // 128
            assert untouched(rows[edge:]), f"{name}: written after the bound"
            head = rows[:edge].view(torch.uint8) & 0x7F if rows.dtype == torch.float8_e4m3fn else rows[:edge]
            assert not (head == 0x7F).any() if rows.dtype == torch.float8_e4m3fn else not head.isnan().any(), name


def test_experts_choose_host_counts_by_device_and_path():
    """The FP8 paths want the counts on the host except the fused one on Hopper; float experts never."""
    cpu = torch.device("cpu")
    assert not GroupedExperts(2, 128, 128, torch.bfloat16, backend="reference").counts_on_host(cpu)
    fused = _experts(kernel_ops(), True, 2, 128, 128, "cpu")
    assert fused.counts_on_host(cpu)  # the interpreter / a CPU: no Gluon kernels
    fused.host_counts = False
    assert not fused.counts_on_host(cpu)
    unfused = _experts(replace(kernel_ops(), grouped_contiguous=None), True, 2, 128, 128, "cpu")
    assert unfused.counts_on_host(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fused_fp8_experts_on_hopper_never_wait_for_the_gpu_from_routing_to_gradients():
    """On a Hopper GPU the FP8 experts take no counts to the host: the whole layer from the routing's indices,
    the count and the plan included, forward and backward, runs under ``set_sync_debug_mode("error")``, its
    memory-bound kernels stopping at the worst-case plan's row bound read on the GPU; and it gives the gradients
    of the path with the counts on the host (an exact plan, no bound)."""
    from moeplan.kernels.fp8_gemm_ws import runs_on

    if not runs_on(torch.device("cuda")):
        pytest.skip("the Gluon kernels need a Hopper GPU")
    E, d, inter, n, k = 32, 7168, 2048, 4096, 8
    experts = _experts(kernel_ops(), True, E, d, inter, "cuda")
    assert not experts.counts_on_host(torch.device("cuda"))
    x = layer_without_host_sync(experts, n, d, k, seed=39)
    assert torch.isfinite(x.grad).all() and torch.isfinite(experts.down_proj.grad).all()
    exact = _experts(kernel_ops(), True, E, d, inter, "cuda")
    exact.host_counts = True
    x_exact = layer_without_host_sync(exact, n, d, k, seed=39, run=lambda step: (step(), step()))
    for name, got, want in (("dx", x.grad, x_exact.grad), ("dgate_up", experts.gate_up_proj.grad,
                            exact.gate_up_proj.grad), ("ddown", experts.down_proj.grad, exact.down_proj.grad)):
        assert rel_err(got, want) < TOL_FUSED, name


def layer_without_host_sync(experts: GroupedExperts, n: int, d: int, k: int, seed: int,
                            run=None) -> torch.Tensor:
    """``experts`` forward and backward on ``n`` tokens of width ``d``, each routed to ``k`` distinct experts at
    random, through ``step_without_host_sync`` (or ``run``, given the step); returns the input, its gradient
    filled."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(experts.num_experts, generator=g)[:k] for _ in range(n)]).cuda()
    weights = torch.rand(n, k, generator=g).cuda().requires_grad_(True)
    x = rand(n, d, seed=seed + 1, device="cuda", dtype=torch.bfloat16).requires_grad_(True)

    def step() -> None:
        out, _ = experts(x, indices, weights)
        out.float().square().mean().backward()

    (run or step_without_host_sync)(step)
    return x


def step_without_host_sync(step) -> None:
    """``step()`` once (the first call of each GEMM shape times its backends), then again under
    ``set_sync_debug_mode("error")``, which raises on any host synchronisation."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fused_fp8_experts_never_wait_for_the_gpu():
    """At V3's expert shapes: given the per-expert counts on the host (the layer's one planned sync, in
    ``forward_pairs``), building the plan, the fused forward and its backward run under
    ``set_sync_debug_mode("error")``, which raises on any host synchronisation."""
    E, d, inter, n, k = 32, 7168, 2048, 4096, 8
    experts = _experts(kernel_ops(), True, E, d, inter, "cuda")
    g = torch.Generator().manual_seed(39)
    expert_of_pair = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]).reshape(-1).cuda()
    token_of_pair = torch.arange(n * k, device="cuda") // k
    weight = torch.rand(n * k, generator=g).cuda().requires_grad_(True)
    x = rand(n, d, seed=40, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    host_counts = torch.bincount(expert_of_pair, minlength=E).tolist()

    def step() -> None:
        plan = make_pair_plan(token_of_pair, expert_of_pair, n, host_counts)
        out = FusedExpertsFn.apply(x, weight, experts.gate_up_proj, experts.down_proj, plan, experts.fp8, True,
                                      None, host_counts, True)
        out.float().square().mean().backward()

    step_without_host_sync(step)
    assert torch.isfinite(x.grad).all() and torch.isfinite(experts.down_proj.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fused_fp8_expert_weight_gradients_accumulate_into_main_gradients():
    """With FP32 main gradients attached (as the runtime does), the FP8 backward's two grouped Wgrads add into
    them inside the GEMM (``weight_grad.fused_main_grad_fp8``): no ``.grad`` is written, and two micro-batches
    leave twice one micro-batch's gradient, which equals the gradient the path without main gradients returns."""
    E, d, inter, n = 32, 7168, 2048, 4096
    pairs = _ragged_pairs(n, E, "cuda")
    x0 = rand(n, d, seed=34, device="cuda", dtype=torch.bfloat16)
    dy = rand(n, d, seed=35, device="cuda", dtype=torch.bfloat16)
    plain = _experts(kernel_ops(), True, E, d, inter, "cuda")
    _, want = _run(plain, x0, pairs, dy)
    experts = _experts(kernel_ops(), True, E, d, inter, "cuda")
    for p in (experts.gate_up_proj, experts.down_proj):
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device="cuda")
    for _ in range(2):
        _, got = _run(experts, x0, pairs, dy)
        assert got[3] is None and got[4] is None  # accumulated in place, nothing left for autograd
    assert rel_err(experts.gate_up_proj.main_grad / 2, want[3].float()) < 1e-2
    assert rel_err(experts.down_proj.main_grad / 2, want[4].float()) < 1e-2
