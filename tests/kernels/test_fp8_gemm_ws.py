"""The warp-specialised Gluon FP8 GEMM (kernels/fp8_gemm_ws.py).

On the CPU machine: the kernel compiled offline for sm_90a, read through ptxas and the SASS (FP8
wgmma present, no spills, the promotion one FFMA per accumulator element). On an H200: against
float64 on the dequantised operands, outputs poisoned, odd sizes, the three training GEMMs.
"""

import re
import subprocess
from pathlib import Path

import pytest  # noqa: E402
import torch

from moeplan.kernels import fp8_gemm_ws  # noqa: E402
from moeplan.kernels.fp8_gemm import fp8_gemm_ref  # noqa: E402
from moeplan.kernels.fp8_quant import quant_act_1x128, quant_act_128x1_t, quant_weight_128x128  # noqa: E402
from tests.kernels.test_kernels import _gemm_operands, rand  # noqa: E402

ON_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(not fp8_gemm_ws.HAVE_GLUON, reason="needs triton with Gluon's Hopper ops")


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _sass(ptx: str, tmp_path: Path) -> tuple[str, str]:
    """(ptxas -v report, SASS) of the PTX, with the ptxas and cuobjdump that ship with triton."""
    src, cubin = tmp_path / "k.ptx", tmp_path / "k.cubin"
    src.write_text(ptx)
    report = subprocess.run([str(_tools() / "ptxas"), "-arch=sm_90a", "-v", str(src), "-o", str(cubin)],
                            capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([str(_tools() / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return report, sass


@needs_gluon
@pytest.mark.parametrize("config", [(128, 4, 16), (128, 5, 16), (256, 4, 16)])
@pytest.mark.parametrize("row_scaled,out_dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_compiles_for_hopper_without_spills(tmp_path, row_scaled, out_dtype, config):
    if row_scaled and config[0] != 128:
        pytest.skip("1x128-row B scales take 128-wide tiles only")
    kernel = fp8_gemm_ws.compile_offline(config=config, rows=row_scaled, out_dtype=out_dtype)
    # the register split asked for (REGS): the first math warpgroup is Triton's default partition,
    # which takes what the others leave of 504
    math_regs, producer_regs = fp8_gemm_ws.REGS[row_scaled]
    splits = re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+);", kernel.asm["ptx"])
    assert splits[:2] == [str(math_regs), str(producer_regs)], splits
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    assert "setmaxnreg" in ptx, "no register split between the math warpgroups and the TMA warp"
    report, sass = _sass(ptx, tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    assert "C7515" not in report, "ptxas serialised the wgmmas: " + report
    assert not re.search(r"\b(LDL|STL)\b", sass), "registers went to local memory"
    ffma = len(re.findall(r"\bFFMA\b", sass))
    # each math warpgroup holds 64 x 128 / 128 = 64 accumulator elements per thread and 128-column
    # piece; with 128x128 weight blocks the promotion is exactly one FFMA each, nothing else
    # with 1x128-row B scales, an FMUL (row scale x column scale) and an FFMA each
    elements = 2 * 64 * config[0] // 128
    assert ffma == elements, f"{ffma} FFMAs for {elements} accumulator elements"
    fmul = len(re.findall(r"\bFMUL\b", sass))
    assert (fmul >= elements) if row_scaled else (fmul < elements // 8), f"{fmul} FMULs"


@needs_gluon
def test_tma_scale_path_reads_no_global_memory(tmp_path):
    """The default path brings both operands' scales in with each stage: the math warpgroups issue
    no global load at all (the 'global' path's first MMA of a K step waits on one)."""
    reports = {}
    for rows in (False, True):
        for path in ("tma", "global"):
            kernel = fp8_gemm_ws.compile_offline(scales=path, rows=rows, out_dtype=torch.float32)
            report, sass = _sass(kernel.asm["ptx"], tmp_path)
            assert "0 bytes spill stores, 0 bytes spill loads" in report, report
            reports[rows, path] = (len(re.findall(r"\bLDG\b", sass)), len(re.findall(r"\bFFMA\b", sass)))
    assert reports[False, "tma"] == (0, 2 * 64 * fp8_gemm_ws.CONFIGS[0][0] // 128), reports
    assert reports[True, "tma"] == (0, 2 * 64), reports  # 1x128-row B: its column scales in the stage too
    assert reports[False, "global"][0] > 0 and reports[True, "global"][0] > 0, reports


@needs_gluon
@pytest.mark.parametrize("config", fp8_gemm_ws.CONFIGS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_ring_fits_in_shared_memory(config, out_dtype):
    """The stages the wrapper picks for an H200 (227 KiB a block) fit: the compiled kernel's
    shared memory, ring, output pieces, barriers and padding, is within the opt-in limit."""
    optin = 232448
    stages = fp8_gemm_ws.ring_stages(config[1], config[0], out_dtype.itemsize, True, optin)
    assert stages >= 3, (config, stages)
    kernel = fp8_gemm_ws.compile_offline(config=(config[0], stages, config[2]), out_dtype=out_dtype)
    assert kernel.metadata.shared <= optin, (config, stages, kernel.metadata.shared)
    if config[0] == 256 and config[1] >= 4 and out_dtype == torch.bfloat16:
        assert stages == 4  # the output pieces take turns: room for a fourth stage


def _math_loop(sass: str) -> list[list[str]]:
    """The math warpgroups' K loops in the SASS, reduced to what orders them: barriers (opcode and
    barrier id), mbarrier ops, warpgroup fences and waits, shared loads, and runs of MMAs and of
    FFMAs collapsed to one "GMMA" or "FFMA" each (a loop runs from an mbarrier wait to its backward
    branch; the TMA warp's has no MMA and is dropped)."""
    loops, current = [], None
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4})\*/\s*(@!?U?P\d\s+)?([A-Z0-9_.]+)\s*([^,;]*)", line)
        if not m:
            continue
        address, op, first = int(m.group(1), 16), m.group(3), m.group(4).strip()
        if op.startswith("SYNCS.PHASECHK") and current is None:
            current = []
        if current is None:
            continue
        if op == "BRA" and int(first, 16) < address:  # a backward branch closes the loop
            if "GMMA" in current:
                loops.append(current)
            current = None
            continue
        if op.startswith(("QGMMA", "HGMMA")):
            name = "GMMA"
        elif op == "FFMA":
            name = "FFMA"
        elif op.startswith("BAR."):
            name = f"{op.split('.')[1]} {first}"
        elif op.startswith(("WARPGROUP", "SYNCS", "LDS")):
            name = op.split(".")[0] if op.startswith("LDS") else op
        else:
            continue
        if not (name in ("GMMA", "FFMA") and current and current[-1] == name):
            current.append(name)
    return loops


@needs_gluon
@pytest.mark.parametrize("order", list(fp8_gemm_ws.ORDERS))
def test_turn_taking_barriers_where_intended(tmp_path, order):
    """The orders of ORDERS as ptxas leaves them. "free": no turn barrier, and the barriers it
    takes (TURN_BARRIERS) are ones Triton's warp specialisation does not use. "issue": each
    warpgroup arrives on its barrier right after issuing an MMA and syncs on the other's only
    after its promotion's FFMAs. "complete": the arrive comes right after the MMA's wait and the
    FFMAs only after it (B's scale is read behind it: a bare arrive would sink below them)."""
    report, sass = _sass(fp8_gemm_ws.compile_offline(order=order).asm["ptx"], tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
    ids = {int(m, 16) for m in re.findall(r"BAR\.(?:SYNC|ARV|RED)[.A-Z_]*\s+0x([0-9a-f]+)", sass)}
    turns = set(fp8_gemm_ws.TURN_BARRIERS)
    loops = _math_loop(sass)
    assert len(loops) == 2, loops  # one per math warpgroup
    if order == "free":
        assert not ids & turns, ids
        return
    assert turns <= ids, ids
    for loop in loops:
        text = " | ".join(loop)
        syncs = re.findall(r"(\S+) \| SYNC (0x[89]) \| (\S+)", text)  # the turn waits: what is around them
        arrives = re.findall(r"(\S+) \| ARV (0x[89]) \| (\S+)", text)
        assert syncs and arrives and all(s[2] == "WARPGROUP.ARRIVE" for s in syncs), text  # right before an MMA
        assert all(s[0] == "FFMA" for s in syncs[1:]), text  # after the previous promotion
        if order == "issue":
            assert all(a[0] == "GMMA" for a in arrives), text
        else:
            assert all(a[0] == "WARPGROUP.DEPBAR.LE" and a[2] == "LDS" for a in arrives), text


def test_order_names_are_checked():
    with pytest.raises(ValueError, match="order='alternate'"):
        fp8_gemm_ws._constexprs(fp8_gemm_ws.CONFIGS[0], rows=False, promote=True, order="alternate")
    assert fp8_gemm_ws._constexprs(fp8_gemm_ws.CONFIGS[0], rows=False, promote=True)["ORDER"] == \
        fp8_gemm_ws.ORDERS[fp8_gemm_ws.ORDER]


def test_scale_path_names_are_checked():
    with pytest.raises(ValueError, match="scales='fast'"):
        fp8_gemm_ws._constexprs(fp8_gemm_ws.CONFIGS[0], rows=False, promote=True, scales="fast")
    with pytest.raises(ValueError, match="scales='none'"):
        fp8_gemm_ws._constexprs(fp8_gemm_ws.WIDTHS[128], rows=True, promote=True, scales="none")
    rows = fp8_gemm_ws._constexprs(fp8_gemm_ws.WIDTHS[128], rows=True, promote=True)
    assert rows["SCALES"] == fp8_gemm_ws.SCALE_PATHS["tma"]
    assert (rows["MATH_REGS"], rows["PRODUCER_REGS"]) == fp8_gemm_ws.REGS[True]
    with pytest.raises(ValueError, match="BLOCK_N must be 128"):
        fp8_gemm_ws._constexprs(fp8_gemm_ws.WIDTHS[256], rows=True, promote=True)


def test_tma_scales_layout():
    """A's scales K-block-major at a pitch of M rounded up to 4, B's rows padded to 4 K blocks; both
    free when the quantiser already laid them out so."""
    sa = torch.rand(130, 3)
    sb = torch.rand(2, 3)
    flat, pitch, sb4, sb_pitch = fp8_gemm_ws.tma_scales(sa, sb)
    assert pitch == 132 and sb4.stride(0) == 4 and torch.equal(sb4, sb) and sb_pitch == 0
    for kb in range(3):
        assert torch.equal(flat[kb * pitch: kb * pitch + 130], sa[:, kb])
    mn = torch.empty(3, 132)[:, :130].t()  # MN-major, 16-byte pitch
    mn.copy_(sa)
    flat2, pitch2, _, _ = fp8_gemm_ws.tma_scales(mn, torch.rand(2, 4))
    assert pitch2 == 132 and flat2.data_ptr() == mn.data_ptr()
    # 1x128-row B scales (N, k_blocks) are laid out as A's: K-block-major at N rounded up to 4
    rows_b = torch.rand(257, 3)
    _, _, flat_b, pitch_b = fp8_gemm_ws.tma_scales(sa, rows_b, rows=True)
    assert pitch_b == 260
    for kb in range(3):
        assert torch.equal(flat_b[kb * pitch_b: kb * pitch_b + 257], rows_b[:, kb])


def test_quantiser_scales_feed_tma_without_copy():
    """quant_act_1x128 writes its scales MN-major at a 16-byte pitch: the layout the producer's TMA
    reads (and cuBLAS's block scaling), so neither copies them per call."""
    dev = "cuda" if ON_GPU else "cpu"
    _, sa = quant_act_1x128(rand(130, 384, seed=3, device=dev))
    assert sa.shape == (130, 3) and sa.stride() == (1, 132)
    flat, pitch, _, _ = fp8_gemm_ws.tma_scales(sa, torch.ones(1, 4, device=dev))
    assert pitch == 132 and flat.data_ptr() == sa.data_ptr()
    _, sx = quant_act_128x1_t(rand(384, 257, seed=4, device=dev))  # the weight gradient's B: (257, 3)
    _, _, flat_b, pitch_b = fp8_gemm_ws.tma_scales(sa, sx, rows=True)
    assert pitch_b == 260 and flat_b.data_ptr() == sx.data_ptr()


def test_refuses_without_gluon_or_gpu():
    a = torch.zeros(128, 128, dtype=torch.float8_e4m3fn)
    s = torch.ones(128, 1)
    if ON_GPU:
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="Gluon"):
        fp8_gemm_ws.fp8_gemm_ws(a, s, a, s[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("recipe", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("M,N,K", [(304, 208, 1008), (144, 384, 272), (4096, 2112, 7168), (1008, 7168, 2048)])
def test_matches_float64(M, N, K, recipe, monkeypatch):
    a, sa, b, sb = _gemm_operands(M, N, K, recipe, "cuda")
    ref = fp8_gemm_ref(a, sa, b, sb)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *s, **k: real_empty(*s, **k).fill_(float("nan")))
    for out_dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 6e-3)):
        out = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, out_dtype=out_dtype)
        assert out.shape == (a.shape[0], b.shape[0]) and out.dtype == out_dtype
        assert torch.isfinite(out).all(), "unwritten (poisoned) output"
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < tol, (recipe, out_dtype, err)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
def test_promotes_at_long_k():
    """All-positive operands: unpromoted, the tensor cores' partial sums lose precision as K grows."""
    errors = {}
    for K in (1024, 16384):
        a, sa = quant_act_1x128(rand(256, K, seed=11, device="cuda").abs())
        b, sb, _ = quant_weight_128x128(rand(256, K, seed=12, device="cuda").abs())
        out = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, out_dtype=torch.float32)
        ref = fp8_gemm_ref(a, sa, b, sb)
        errors[K] = float((out.double() - ref).norm() / ref.norm())
    assert errors[16384] < 1e-3 and errors[16384] < 1.5 * errors[1024], errors


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("config", fp8_gemm_ws.CONFIGS)
@pytest.mark.parametrize("M,N,K", [(130, 384, 272), (1000, 2112, 128), (4096, 7168, 2048)])
def test_every_config_matches_float64(M, N, K, config):
    a, sa, b, sb = _gemm_operands(M, N, K, "forward", "cuda")
    ref = fp8_gemm_ref(a, sa, b, sb)
    out = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, out_dtype=torch.float32, config=config)
    err = float((out.double() - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and err < 1e-3, (config, err)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("path", ["tma", "global"])
@pytest.mark.parametrize("recipe", ["forward", "wgrad"])
@pytest.mark.parametrize("M,N,K", [(129, 257, 4096), (130, 384, 272), (301, 2112, 1136)])
def test_scale_paths_match_float64(M, N, K, recipe, path):
    """Odd M (A's scale pitch padded to 4), K blocks not a multiple of 4 (B's padded), and A's
    scales in both layouts: row-major as the reference quantiser writes them, and MN-major; the
    weight gradient's 1x128-row B scales the same way (an odd N pads their pitch too). M, N, K are
    the GEMM's: the weight gradient of a layer with N_layer = M, K_layer = N over K tokens."""
    if recipe == "wgrad":
        a, sa, b, sb = _gemm_operands(K, M, N, recipe, "cuda")  # dy (K, M)ᵀ · x (K, N)
    else:
        a, sa, b, sb = _gemm_operands(M, N, K, recipe, "cuda")
    assert a.shape == (M, K) and b.shape == (N, K)
    ref = fp8_gemm_ref(a, sa, b, sb)
    scale_layouts = [(s_a, sb) for s_a in (sa.contiguous(), sa.t().contiguous().t())]
    if recipe == "wgrad":
        scale_layouts.append((sa, sb.contiguous()))  # B's row scales row-major: copied to the TMA layout
    for scales_a, scales_b in scale_layouts:
        out = fp8_gemm_ws.fp8_gemm_ws(a, scales_a, b, scales_b, out_dtype=torch.float32, scales=path)
        err = float((out.double() - ref).norm() / ref.norm())
        assert torch.isfinite(out).all() and err < 1e-3, (path, scales_a.stride(), scales_b.stride(), err)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
def test_direct_launch_matches_the_jit():
    """After the first launch of a specialisation the wrapper calls the compiled kernel's C launcher
    itself, with tensor maps it caches by address, shape and strides: the same result as a fresh
    JIT launch, a new compiled entry whenever the specialisation changes, and new maps (so the
    right result) for new tensors of the same shape."""
    fp8_gemm_ws._COMPILED.clear()
    fp8_gemm_ws._MAPS.maps.clear()
    a, sa, b, sb = _gemm_operands(256, 384, 1024, "forward", "cuda")
    first = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb)
    assert len(fp8_gemm_ws._COMPILED) == 1
    (kernel, direct), = fp8_gemm_ws._COMPILED.values()
    assert direct is not None, "Triton's launcher is not the structure the direct path expects"
    assert torch.equal(fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb), first)
    assert len(fp8_gemm_ws._COMPILED) == 1 and len(fp8_gemm_ws._MAPS.maps) == 5
    a2, sa2, b2, sb2 = _gemm_operands(257, 384, 1024, "forward", "cuda")  # M % 16 differs
    out = fp8_gemm_ws.fp8_gemm_ws(a2, sa2, b2, sb2, out_dtype=torch.float32)
    assert len(fp8_gemm_ws._COMPILED) == 2
    ref = fp8_gemm_ref(a2, sa2, b2, sb2)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-3
    for seed in (5, 6):  # same shapes, other tensors: the direct path with fresh maps
        x, w = rand(256, 1024, seed=seed, device="cuda"), rand(384, 1024, seed=seed + 10, device="cuda")
        (a3, sa3), (b3, sb3, _) = quant_act_1x128(x), quant_weight_128x128(w)
        out = fp8_gemm_ws.fp8_gemm_ws(a3, sa3, b3, sb3, out_dtype=torch.float32)
        ref = fp8_gemm_ref(a3, sa3, b3, sb3)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-3, seed
    fp8_gemm_ws._COMPILED.clear()


def test_dispatch_refuses_gluon_where_it_does_not_apply():
    """backend="gluon" off Hopper, or where TMA cannot read an operand, is a clear ValueError (the
    auto dispatch drops it)."""
    from moeplan.kernels.fp8_gemm import fp8_gemm

    dev = "cuda" if ON_GPU else "cpu"
    a = torch.randn(256, 256, device=dev).to(torch.float8_e4m3fn)
    rows = torch.ones(256, 2, device=dev)
    with pytest.raises(ValueError, match="Gluon"):
        fp8_gemm(a.t(), rows, a, rows, backend="gluon")  # A not K-contiguous
    if not ON_GPU:
        for b_scale in (rows, torch.ones(2, 2)):  # 1x128 rows (the weight gradient) and 128x128 blocks
            with pytest.raises(ValueError, match="Gluon"):
                fp8_gemm(a, rows, a, b_scale, backend="gluon")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
def test_auto_dispatch_considers_gluon():
    from moeplan.kernels.fp8_gemm import _BACKEND_CACHE, chosen_backend, fp8_gemm

    a, sa, b, sb = _gemm_operands(4096, 7168, 2048, "forward", "cuda")
    out = fp8_gemm(a, sa, b, sb, backend="gluon")
    width = _BACKEND_CACHE[("gluon width", tuple(a.shape), tuple(b.shape), torch.bfloat16)]
    assert torch.equal(out, fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, config=fp8_gemm_ws.WIDTHS[int(width)]))
    assert chosen_backend(a, sa, b, sb) in ("triton", "gluon", "torch")
    assert len(_BACKEND_CACHE) >= 1
    # the weight gradient (1x128-row B): 128-wide tiles, no width timed
    a, sa, b, sb = _gemm_operands(4096, 2112, 1536, "wgrad", "cuda")
    out = fp8_gemm(a, sa, b, sb, torch.float32, backend="gluon")
    assert torch.equal(out, fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, config=fp8_gemm_ws.WIDTHS[128]))
    assert ("gluon width", tuple(a.shape), tuple(b.shape), torch.float32) not in _BACKEND_CACHE
    assert chosen_backend(a, sa, b, sb, torch.float32) in ("triton", "gluon", "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("config", [fp8_gemm_ws.WIDTHS[256], fp8_gemm_ws.WIDTHS[128]])
def test_ffma_yields_change_no_result(config):
    """The yield post-pass changes scheduling hints only: the same output, bit for bit."""
    a, sa, b, sb = _gemm_operands(1000, 2112, 1136, "forward", "cuda")
    base = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, config=config, ffma_yield=0)
    for every in (1, 2, 4):
        fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, config=config, ffma_yield=every)  # compiles, stores the patched copy
        assert torch.equal(fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, config=config, ffma_yield=every), base), every


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("order", ["issue", "complete"])
@pytest.mark.parametrize("config", [fp8_gemm_ws.WIDTHS[256], fp8_gemm_ws.WIDTHS[128]])
def test_orders_change_no_result(order, config):
    """Taking turns changes when the MMAs run, not what is added: bit for bit the "free" result
    (forward and dgrad shapes, ragged sizes, 1x128-row B on 128-wide tiles, the grouped layout)."""
    from tests.kernels.test_kernels import _contiguous_layout

    cases = [_gemm_operands(1000, 2112, 1136, "forward", "cuda"), _gemm_operands(301, 7168, 2048, "dgrad", "cuda"),
             _gemm_operands(4096, 7168, 16384, "forward", "cuda")]
    if config[0] == 128:
        cases.append(_gemm_operands(384, 256, 4096, "wgrad", "cuda"))
    for a, sa, b, sb in cases:
        base = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, config=config, order="free")
        out = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, config=config, order=order)
        assert torch.equal(out, base), (order, config, tuple(a.shape), tuple(b.shape))
        ref = fp8_gemm_ref(a, sa, b, sb)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-3
    m_indices, _ = _contiguous_layout([130, 0, 1, 1000], "cuda")
    m_indices = torch.cat([m_indices, torch.full((128,), -1, dtype=torch.int32, device="cuda")])
    a, sa = quant_act_1x128(rand(m_indices.numel(), 2048, seed=31, device="cuda"))
    b, sb, _ = quant_weight_128x128(rand(4, 2112, 2048, seed=32, device="cuda"))
    runs = [fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, config=config, m_indices=m_indices, order=o)
            for o in ("free", order)]
    assert torch.equal(runs[0], runs[1]), (order, config, "grouped")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("N,K", [(4096, 7168), (2112, 1536), (384, 272)])
@pytest.mark.parametrize("config", [fp8_gemm_ws.WIDTHS[256], fp8_gemm_ws.WIDTHS[128]])
def test_grouped_matches_float64(N, K, config, monkeypatch):
    """The contiguous layout: experts with 0, 1, 130 and 1000 rows, a padding-only tile at the end,
    padding rows of A that are not zero (they must still come out as zeros), a ragged N whose
    256-wide tiles read into the next expert's rows (never stored), the forward and the dgrad
    (transposed weight copy, non-contiguous scales); outputs poisoned before launch."""
    from moeplan.kernels.fp8_quant import dequant_blocks, dequant_rows
    from moeplan.kernels.grouped_gemm import grouped_gemm_fp8, grouped_gemm_ref
    from tests.kernels.test_kernels import _contiguous_layout

    counts = [130, 0, 1, 1000]
    m_indices, _ = _contiguous_layout(counts, "cuda")
    m_indices = torch.cat([m_indices, torch.full((128,), -1, dtype=torch.int32, device="cuda")])
    M, E = m_indices.numel(), len(counts)
    a, sa = quant_act_1x128(rand(M, K, seed=21, device="cuda"))  # padding rows hold data
    b, sb, bt = quant_weight_128x128(rand(E, N, K, seed=22, device="cuda"), transposed=True)
    real_empty = torch.empty

    def poisoned(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)
    for (w, sw, ref_w) in ((b, sb, dequant_blocks(b, sb)), (bt, sb.mT, dequant_blocks(bt, sb.mT))):
        if w is bt:
            a_, sa_ = quant_act_1x128(rand(M, N, seed=23, device="cuda"))
        else:
            a_, sa_ = a, sa
        ref = grouped_gemm_ref(dequant_rows(a_, sa_), ref_w, m_indices)  # zeros on padding rows
        out = fp8_gemm_ws.fp8_gemm_ws(a_, sa_, w.contiguous(), sw, torch.float32, config=config, m_indices=m_indices)
        assert torch.isfinite(out).all(), "unwritten (poisoned) output"
        assert (out[m_indices < 0] == 0).all()
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < 1e-3, (config, w is bt, err)
    ref = grouped_gemm_ref(dequant_rows(a, sa), dequant_blocks(b, sb), m_indices)
    via_dispatch = grouped_gemm_fp8(a, sa, b, sb, m_indices, torch.float32, backend="gluon")
    assert float((via_dispatch.double() - ref).norm() / ref.norm()) < 1e-3


@needs_gluon
def test_k_grouped_wgrad_compiles_like_the_dense_wgrad(tmp_path):
    """The experts' K-grouped weight gradient (``fp8_wgrad_ws``) is the dense kernel with 1x128-row B
    scales walking (expert, tile) pairs: the same register split, no spills, the same promotion (an FMUL
    and an FFMA per accumulator element) and no global load in the math warpgroups beyond the dense one's."""
    dense = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.float32)
    grouped = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.float32, grouped_k=True)
    counts = {}
    for name, kernel in (("dense", dense), ("grouped", grouped)):
        ptx = kernel.asm["ptx"]
        splits = re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+);", ptx)
        assert splits[:2] == [str(r) for r in fp8_gemm_ws.REGS[True]], splits
        report, sass = _sass(ptx, tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, report
        counts[name] = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("FFMA", "FMUL")}
    assert counts["grouped"]["FFMA"] == counts["dense"]["FFMA"] == 2 * 64, counts
    assert counts["grouped"]["FMUL"] == counts["dense"]["FMUL"], counts
    with pytest.raises(ValueError, match="K-grouped"):
        fp8_gemm_ws.compile_offline(rows=False, grouped_k=True)


@needs_gluon
@pytest.mark.parametrize("grouped_k", [False, True], ids=["dense", "k_grouped"])
def test_accumulating_epilogue_gets_the_old_values_as_configured_without_spills(tmp_path, grouped_k, monkeypatch):
    """``accumulate_into`` with each ``OLD_VALUES`` path, compiled for sm_90a: "l2" has each math thread prefetch
    its share of the tile's old FP32 values into L2 before the K loop (4 lines of 128 bytes: 64 rows x 128 columns
    over 128 threads); "tma" has each math warpgroup ask the copy engine for its 64 x 128 piece (one more 2-D
    tensor load and expect_tx each, beside the producer's A and B) and no prefetch; "after" neither; "reduce" reads
    no old values at all and stores through the copy engine's reduction (one ``cp.reduce.async.bulk.tensor ... add``
    a math warpgroup, where the others have a plain bulk store). None spills; "tma" at 256-wide tiles (which share
    one output buffer between two pieces) falls back to "l2", "reduce" stays."""
    loads = "cp.async.bulk.tensor.2d.shared::cluster.global"
    stores, reduces = "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group", "cp.reduce.async.bulk.tensor.2d."
    seen = {}
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", None)  # OLD_VALUES for both kinds here
    for path in ("after", "l2", "tma", "reduce"):
        monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", path)
        kernel = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.float32, grouped_k=grouped_k,
                                             accumulate=True)
        ptx = kernel.asm["ptx"]
        seen[path] = (ptx.count("prefetch.global.L2"), ptx.count(loads), ptx.count("expect_tx"), ptx.count(stores),
                      ptx.count(reduces))
        report, _ = _sass(ptx, tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, (path, report)
    assert seen == {"after": (0, 2, 1, 2, 0), "l2": (4, 2, 1, 2, 0), "tma": (0, 4, 3, 2, 0),
                    "reduce": (0, 2, 1, 0, 2)}, seen
    monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", "reduce")
    assert fp8_gemm_ws._constexprs((256, 4, 16), rows=False, promote=True, accumulate=True)["ACCUMULATE"] == 4
    monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", "tma")
    # DENSE_OLD_VALUES, where set, is the dense Wgrads' path; the K-grouped ones keep OLD_VALUES
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", "reduce")
    assert fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, accumulate=True)["ACCUMULATE"] == 4
    assert fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, accumulate=True,
                                   grouped_k=True)["ACCUMULATE"] == 3
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", "l4")
    with pytest.raises(ValueError, match="DENSE_OLD_VALUES='l4'"):
        fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, accumulate=True)
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", None)
    plain = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.float32, grouped_k=grouped_k)
    assert "prefetch" not in plain.asm["ptx"] and plain.asm["ptx"].count(loads) == 2
    assert fp8_gemm_ws._constexprs((256, 4, 16), rows=False, promote=True, accumulate=True)["ACCUMULATE"] == 2
    monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", "l3")
    with pytest.raises(ValueError, match="OLD_VALUES"):
        fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, accumulate=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("M,N", [(4096, 7168), (7168, 2048), (256, 272)])
def test_k_grouped_wgrad_matches_float64(M, N, monkeypatch):
    """Experts with 130, 0, 1, 1000 and 257 tokens in the contiguous layout (segments padded to 128, the
    padding columns zero as the permute writes them): each expert's dW against float64 on the dequantised
    operands, the empty expert's exactly zero, outputs poisoned before launch; the dispatcher's "gluon"
    backend takes host bounds too; and each expert's result is the dense kernel's on its own segment."""
    from moeplan.kernels.fp8_quant import dequant_rows
    from moeplan.kernels.grouped_gemm import grouped_wgrad_fp8, grouped_wgrad_ref
    from tests.kernels.test_kernels import _contiguous_layout

    counts = [130, 0, 1, 1000, 257]
    m_indices, offsets = _contiguous_layout(counts, "cuda")
    rows = m_indices.numel()
    pad = (m_indices < 0)[:, None]
    dy = rand(rows, M, seed=41, device="cuda").masked_fill(pad, 0)
    x = rand(rows, N, seed=42, device="cuda").masked_fill(pad, 0)
    a_t, sa_t = quant_act_128x1_t(dy)  # (M, rows)
    b_t, sb_t = quant_act_128x1_t(x)  # (N, rows)
    ref = grouped_wgrad_ref(dequant_rows(a_t, sa_t), dequant_rows(b_t, sb_t), offsets)
    real_empty = torch.empty

    def poisoned(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)
    out = fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, offsets)
    assert out.shape == (len(counts), M, N) and torch.isfinite(out).all(), "unwritten (poisoned) output"
    assert (out[1] == 0).all()
    for e in (0, 2, 3, 4):
        err = float((out[e].double() - ref[e]).norm() / ref[e].norm())
        assert err < 1e-3, (e, err)
    via_dispatch = grouped_wgrad_fp8(a_t, sa_t, b_t, sb_t, offsets.cpu(), backend="gluon")
    assert torch.equal(via_dispatch, out)
    lo, hi = int(offsets[3]), int(offsets[4])
    dense = fp8_gemm_ws.fp8_gemm_ws(a_t[:, lo:hi].contiguous(), sa_t[:, lo // 128:hi // 128], b_t[:, lo:hi].contiguous(),
                                    sb_t[:, lo // 128:hi // 128], torch.float32)
    assert float((dense - out[3]).abs().max()) <= 1e-5 * float(out[3].abs().max())


def test_a_plan_is_not_reused_after_the_old_value_paths_change(monkeypatch):
    """``_plan``'s cache key holds the paths of an accumulating launch (``_paths``), so setting ``OLD_VALUES`` or
    ``DENSE_OLD_VALUES`` takes effect at the next launch without clearing the cache; a plain launch's key has none."""
    target = torch.zeros(1)
    assert fp8_gemm_ws._paths(None) == ()
    monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", "tma")
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", "reduce")
    first = fp8_gemm_ws._paths(target)
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", None)
    assert first[:2] == ("tma", "reduce") and fp8_gemm_ws._paths(target)[:2] == ("tma", None)
    monkeypatch.setattr(fp8_gemm_ws, "TALL_OLD_VALUES", "after")
    assert fp8_gemm_ws._paths(target)[2] == "after"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("old_values", ["after", "l2", "tma", "reduce"])
def test_weight_gradients_accumulate_into_fp32_main_gradients(old_values, monkeypatch):
    """``accumulate_into``: the epilogue adds the product to the tensor's old values (an FP32 main gradient), for
    the dense Wgrad (1x128-row B scales; also 200 rows, a tile's rows past the tensor) and the experts' K-grouped
    one; the result is the non-accumulating product plus the old values, bit for bit (one FP32 addition either
    way), and an empty expert keeps its slice."""
    from tests.kernels.test_kernels import _contiguous_layout

    monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", old_values)
    monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", None)  # the dense Wgrad below takes the same path
    for rows in (256, 200):
        a, sa, b, sb = _gemm_operands(384, rows, 4096, "wgrad", "cuda")  # dW (rows, 4096) = dy^T x
        old = rand(rows, 4096, seed=51, device="cuda")
        target = old.clone()
        out = fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, accumulate_into=target)
        assert out.data_ptr() == target.data_ptr()
        assert torch.equal(target, old + fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32)), rows
    counts = [130, 0, 1000]
    m_indices, offsets = _contiguous_layout(counts, "cuda")
    pad = (m_indices < 0)[:, None]
    a_t, sa_t = quant_act_128x1_t(rand(m_indices.numel(), 512, seed=52, device="cuda").masked_fill(pad, 0))
    b_t, sb_t = quant_act_128x1_t(rand(m_indices.numel(), 384, seed=53, device="cuda").masked_fill(pad, 0))
    old = rand(len(counts), 512, 384, seed=54, device="cuda")
    target = old.clone()
    fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, offsets, accumulate_into=target)
    assert torch.equal(target, old + fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, offsets))
    assert torch.equal(target[1], old[1])
    with pytest.raises(ValueError, match="accumulate_into"):
        fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, accumulate_into=old[0, :, :255])


@needs_gluon
def test_k_grouped_segment_tables_compile_without_spills(tmp_path):
    """``fp8_wgrad_ws`` with 2 and 4 segment tables (micro-batches' layouts side by side along K), compiled for
    sm_90a, plain and accumulating: no spills, the same registers as one table; the producer reads each table's
    bounds (more scalar loads than one table's, which keeps its own count)."""
    loads = {}
    for segments in (1, 2, 4):
        for accumulate in (False, True):
            kernel = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.float32, grouped_k=segments,
                                                 accumulate=accumulate)
            report, _ = _sass(kernel.asm["ptx"], tmp_path)
            assert "0 bytes spill stores, 0 bytes spill loads" in report, (segments, report)
            loads[segments, accumulate] = kernel.asm["ptx"].count("ld.global")
    assert loads[1, False] < loads[2, False] < loads[4, False], loads
    plain_one = fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, grouped_k=True)
    assert plain_one["GROUPED_K"] == 1
    assert fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, grouped_k=4)["GROUPED_K"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("accumulate", [False, True])
def test_segment_tables_are_one_table_of_each_experts_segments_side_by_side(accumulate):
    """Two micro-batches' layouts side by side along K, one launch with both segment tables, against one launch on
    the same columns reordered so that each expert's two segments are adjacent (one table): the same K blocks in the
    same order, so the same bits; accumulating, into FP32 main gradients too; an expert empty in one table."""
    from tests.kernels.test_kernels import _contiguous_layout

    tables = [[130, 0, 1000, 257], [0, 200, 128, 1]]
    offsets = []
    base = 0
    for counts in tables:
        _, off = _contiguous_layout(counts, "cuda")
        offsets.append(off + base)
        base += int(off[-1])
    segs = torch.stack(offsets).contiguous()  # (2, E + 1), bounds counted from K's start
    E, M, N = 4, 256, 384
    a_t, sa_t = quant_act_128x1_t(rand(base, M, seed=61, device="cuda"))  # (M, K) in 128x1 tiles
    b_t, sb_t = quant_act_128x1_t(rand(base, N, seed=62, device="cuda"))
    # one table: expert e's segment of table 0, then of table 1
    blocks, single = [], [0]
    for e in range(E):
        for t in range(2):
            lo, hi = int(segs[t, e]) // 128, int(segs[t, e + 1]) // 128
            blocks += list(range(lo, hi))
        single.append(len(blocks) * 128)
    cols = torch.tensor([b * 128 + i for b in blocks for i in range(128)], device="cuda")
    idx = torch.tensor(blocks, device="cuda")
    one = torch.tensor(single, dtype=torch.int32, device="cuda")
    a1, sa1, b1, sb1 = (a_t[:, cols].contiguous(), sa_t[:, idx].contiguous(), b_t[:, cols].contiguous(),
                        sb_t[:, idx].contiguous())
    if accumulate:
        old = rand(E, M, N, seed=63, device="cuda")
        got, want = old.clone(), old.clone()
        fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, segs, accumulate_into=got)
        fp8_gemm_ws.fp8_wgrad_ws(a1, sa1, b1, sb1, one, accumulate_into=want)
    else:
        got = fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, segs)
        want = fp8_gemm_ws.fp8_wgrad_ws(a1, sa1, b1, sb1, one)
    assert torch.equal(got, want)
    assert float(got.abs().sum()) > 0
    with pytest.raises(ValueError, match="seg_offsets"):
        fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, segs.repeat(3, 1))  # 6 tables: more than MAX_SEGMENTS


@needs_gluon
@pytest.mark.parametrize("grouped_k", [0, 1, 4])
def test_tall_wgrad_tiles_compile_without_spills(tmp_path, grouped_k, monkeypatch):
    """256-row output tiles for 1x128-row B scales (``block_m=256``): each math warpgroup promotes two 64-row pieces
    against one B tile (twice the 128-row tile's FFMAs and FMULs, one per accumulator element each), plain and
    accumulating by every old-value path ("tma" becomes "l2": the pieces share the output buffer), with no spill,
    and the ring the wrapper picks fits in an H100's or H200's shared memory."""
    optin = 232448
    stages = fp8_gemm_ws.ring_stages(4, 128, 4, True, optin, rows=True, block_m=256)
    assert stages == 3
    if grouped_k:  # K-grouped tall tiles take TALL_OLD_VALUES where set ("reduce"), OLD_VALUES where None
        assert fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, grouped_k=grouped_k, accumulate=True,
                                       block_m=256)["ACCUMULATE"] == fp8_gemm_ws.OLD_VALUE_PATHS["reduce"]
    monkeypatch.setattr(fp8_gemm_ws, "TALL_OLD_VALUES", None)
    for path in (None, "after", "l2", "tma", "reduce"):
        if path is not None:
            monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", path)
            monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", None)
        kernel = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.float32, grouped_k=grouped_k,
                                             accumulate=path is not None, block_m=256)
        assert kernel.metadata.shared <= optin, (path, kernel.metadata.shared)
        report, sass = _sass(kernel.asm["ptx"], tmp_path)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, (path, report)
        counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("FFMA", "FMUL")}
        assert counts["FFMA"] == 2 * 2 * 64 and counts["FMUL"] >= 2 * 2 * 64, (path, counts)
        if path is None and not grouped_k:  # a BF16 weight gradient (no main gradient) as well
            bf16 = fp8_gemm_ws.compile_offline(rows=True, out_dtype=torch.bfloat16, block_m=256)
            assert bf16.metadata.shared <= optin
            assert "0 bytes spill stores, 0 bytes spill loads" in _sass(bf16.asm["ptx"], tmp_path)[0]
        if path is not None:
            expected = fp8_gemm_ws.OLD_VALUE_PATHS["l2" if path == "tma" else path]
            meta = fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, grouped_k=grouped_k,
                                           accumulate=True, block_m=256)
            assert meta["ACCUMULATE"] == expected and meta["M_PIECES"] == 2


def test_tall_tiles_are_refused_where_they_do_not_apply(monkeypatch):
    """256-row tiles only with 1x128-row B scales through TMA, promoted, M a multiple of 256; by default for dense
    Wgrads (``TALL_DENSE``) and K-grouped ones of ``TALL_MIN_SEGMENTS`` tables or more, else 128 rows; an explicit
    256 where it does not apply is refused."""
    with pytest.raises(ValueError, match="block_m=256"):
        fp8_gemm_ws._constexprs(fp8_gemm_ws.CONFIGS[0], rows=False, promote=True, block_m=256)
    with pytest.raises(ValueError, match="block_m=256"):
        fp8_gemm_ws._constexprs((128, 4, 16), rows=True, promote=True, scales="global", block_m=256)
    with pytest.raises(ValueError, match="block_m=192"):
        fp8_gemm_ws._wgrad_block_m(192, True, 256, 0)
    with pytest.raises(ValueError, match="M=384"):
        fp8_gemm_ws._wgrad_block_m(256, True, 384, 1)
    with pytest.raises(ValueError, match="M=576"):
        fp8_gemm_ws._wgrad_block_m(256, True, 576, 0)
    monkeypatch.setattr(fp8_gemm_ws, "TALL_DENSE", True)
    monkeypatch.setattr(fp8_gemm_ws, "TALL_MIN_SEGMENTS", 2)
    assert [fp8_gemm_ws._wgrad_block_m(None, True, 512, s) for s in (0, 1, 2, 4)] == [256, 128, 256, 256]
    assert fp8_gemm_ws._wgrad_block_m(None, True, 576, 0) == 128  # kv_a: not a multiple of 256
    assert fp8_gemm_ws._wgrad_block_m(None, False, 512, 0) == 128  # 128x128 weight blocks: the forward's tiles
    assert fp8_gemm_ws._wgrad_block_m(128, True, 512, 4) == 128
    monkeypatch.setattr(fp8_gemm_ws, "TALL_DENSE", False)
    monkeypatch.setattr(fp8_gemm_ws, "TALL_MIN_SEGMENTS", 5)
    assert [fp8_gemm_ws._wgrad_block_m(None, True, 512, s) for s in (0, 1, 2, 4)] == [128] * 4


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU")
@pytest.mark.parametrize("old_values", [None, "after", "l2", "tma", "reduce"])
def test_tall_tiles_give_the_same_bits(old_values, monkeypatch):
    """256-row output tiles against 128-row ones: the same K blocks promoted in the same order per element, so the
    same bits, plain and accumulating into FP32 (one addition either way): the dense Wgrad (a 256-row tensor is one
    tall tile) and the experts' K-grouped one with two segment tables (an empty expert keeps its slice); K-grouped
    tall tiles take TALL_OLD_VALUES, here each path in turn."""
    from tests.kernels.test_kernels import _contiguous_layout

    if old_values is not None:
        monkeypatch.setattr(fp8_gemm_ws, "OLD_VALUES", old_values)
        monkeypatch.setattr(fp8_gemm_ws, "DENSE_OLD_VALUES", None)
        monkeypatch.setattr(fp8_gemm_ws, "TALL_OLD_VALUES", old_values)
    for rows in (256, 512, 1536):  # tall tiles need M % 256 == 0
        a, sa, b, sb = _gemm_operands(384, rows, 1024, "wgrad", "cuda")  # dW (rows, 1024) = dy^T x
        old = rand(rows, 1024, seed=71, device="cuda")
        got = [fp8_gemm_ws.fp8_gemm_ws(a, sa, b, sb, torch.float32, block_m=bm,
                                       accumulate_into=None if old_values is None else old.clone())
               for bm in (128, 256)]
        assert torch.equal(got[0], got[1]), rows
        assert float(got[1].abs().sum()) > 0
    tables, base = [], 0
    for counts in ([130, 0, 1000, 257], [0, 200, 128, 1]):
        _, off = _contiguous_layout(counts, "cuda")
        tables.append(off + base)
        base += int(off[-1])
    segs = torch.stack(tables).contiguous()
    a_t, sa_t = quant_act_128x1_t(rand(base, 512, seed=72, device="cuda"))
    b_t, sb_t = quant_act_128x1_t(rand(base, 384, seed=73, device="cuda"))
    old = rand(4, 512, 384, seed=74, device="cuda")
    got = [fp8_gemm_ws.fp8_wgrad_ws(a_t, sa_t, b_t, sb_t, segs, block_m=bm,
                                    accumulate_into=None if old_values is None else old.clone()) for bm in (128, 256)]
    assert torch.equal(got[0], got[1])
    assert float(got[1].abs().sum()) > 0
