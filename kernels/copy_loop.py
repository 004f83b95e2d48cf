"""A copy that holds a chosen number of SMs: ``blocks`` programs stream ``src`` into ``dst`` ``passes`` times.

What ``moeplan calibrate`` runs beside a GEMM to measure compute beside communication
(``orchestrator/calibration/beside.py``): like DeepEP's dispatch and combine kernels it occupies a fixed
set of SMs (one program per SM while SMs are free) and moves bytes through HBM for as long as it runs.
Each program walks the buffer with a stride of ``blocks * BLOCK`` elements, so ``blocks`` sets the SMs
and ``passes`` the duration.
"""

import torch

from .triton_compat import tl, triton

BLOCK = 4096  # fp32 elements per program per step: 16 KiB


@triton.jit
def _copy_loop_kernel(
    # pointers: src, dst (numel,) fp32
    src_ptr, dst_ptr,
    # sizes
    numel, passes,
    # meta
    BLOCK: tl.constexpr,
):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    for _ in range(passes):
        for start in range(pid * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def copy_loop(src: torch.Tensor, dst: torch.Tensor, blocks: int, passes: int = 1) -> None:
    """Launch the copy on the current stream: ``blocks`` programs, ``passes`` passes over ``src``."""
    if src.shape != dst.shape or src.dtype != torch.float32 or dst.dtype != torch.float32 or src.dim() != 1:
        raise ValueError(f"copy_loop wants two 1-D fp32 tensors of one shape, got {src.shape} {src.dtype} and "
                         f"{dst.shape} {dst.dtype}")
    if blocks < 1 or passes < 1:
        raise ValueError(f"copy_loop: blocks={blocks} and passes={passes} must be at least 1")
    _copy_loop_kernel[(blocks,)](src, dst, src.numel(), passes, BLOCK=BLOCK, num_warps=4)


def copy_loop_ref(src: torch.Tensor, dst: torch.Tensor) -> None:
    """The torch reference: what any number of passes leaves in ``dst``."""
    dst.copy_(src)
