"""The FFMA yield post-pass (kernels/sass_yield.py) on our own compiled Gluon kernel.

On the CPU machine: the kernel compiled offline for sm_90a, assembled by ptxas, patched, and read
back through cuobjdump: the opcode and control-bit facts the pass relies on hold, and the patch
changes only the chosen FFMAs' reuse flags and yield bit. The GPU half (the patched kernel's
output equals the unpatched one's, bit for bit) is in test_fp8_gemm_ws.py.
"""

import re
import struct
import subprocess

import pytest

from moeplan.kernels import fp8_gemm_ws, sass_yield  # noqa: E402
from tests.kernels.test_fp8_gemm_ws import _tools, needs_gluon  # noqa: E402

LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
WORD = re.compile(r"\s*/\* (0x[0-9a-f]{16}) \*/")


def _instructions(cubin: bytes, tmp_path) -> list[tuple[str, int, int]]:
    """(text, low word, high word) of every instruction, from cuobjdump -sass."""
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([str(_tools() / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    out = []
    for i, line in enumerate(sass):
        m = LINE.match(line)
        if m:
            out.append((m.group(2), int(m.group(3), 16), int(WORD.match(sass[i + 1]).group(1), 16)))
    return out


@pytest.fixture(scope="module")
def cubin(tmp_path_factory):
    if not fp8_gemm_ws.HAVE_GLUON:
        pytest.skip("needs triton with Gluon's Hopper ops")
    tmp = tmp_path_factory.mktemp("sass")
    (tmp / "k.ptx").write_text(fp8_gemm_ws.compile_offline().asm["ptx"])
    subprocess.run([str(_tools() / "ptxas"), "-arch=sm_90a", str(tmp / "k.ptx"), "-o", str(tmp / "k.cubin")],
                   check=True, capture_output=True)
    return (tmp / "k.cubin").read_bytes()


def _mnemonic(text: str) -> str:
    return text.split()[1] if text.startswith("@") else text.split()[0]


@needs_gluon
def test_encoding_facts_hold(cubin, tmp_path):
    """0x223 in the low 12 bits is FFMA and nothing else; ptxas sets the no-yield bit on every
    FFMA, and ``Rb.reuse`` is reuse flag 0x2."""
    rows = _instructions(cubin, tmp_path)
    ffma = [r for r in rows if _mnemonic(r[0]) == "FFMA"]
    assert len(ffma) == 2 * 64 * fp8_gemm_ws.CONFIGS[0][0] // 128
    assert all(lo & sass_yield.OPCODE_MASK == sass_yield.FFMA_OPCODE for _, lo, _ in ffma)
    assert not [r for r in rows if _mnemonic(r[0]) != "FFMA" and r[1] & sass_yield.OPCODE_MASK == sass_yield.FFMA_OPCODE]
    assert all(hi & sass_yield.NO_YIELD_BIT for _, _, hi in ffma)
    reused = [(t, hi) for t, _, hi in ffma if ".reuse" in t]
    assert reused and all(t.split()[3].endswith(".reuse,") and (hi >> 58) & 0xF == 0x2 for t, hi in reused)


@needs_gluon
@pytest.mark.parametrize("every", [1, 2, 4])
def test_patch_changes_only_the_chosen_ffmas(cubin, tmp_path, every):
    patched, changed = sass_yield.interleave_ffma(cubin, every)
    before, after = _instructions(cubin, tmp_path), _instructions(patched, tmp_path)
    assert len(before) == len(after) and len(patched) == len(cubin)
    seen = 0
    for (t0, lo0, hi0), (t1, lo1, hi1) in zip(before, after):
        if _mnemonic(t0) != "FFMA":
            assert (t0, lo0, hi0) == (t1, lo1, hi1)
            continue
        seen += 1
        assert lo0 == lo1 and t1 == t0.replace(".reuse", "") if seen % every == 0 else (t0, hi0) == (t1, hi1)
        if seen % every == 0:
            assert hi1 == hi0 & ~(sass_yield.NO_YIELD_BIT | sass_yield.REUSE_BITS)
    assert changed == seen // every


def test_zero_changes_nothing_and_non_elf_is_refused():
    blob = b"\x7fELF" + bytes([2, 1]) + bytes(58)
    assert sass_yield.interleave_ffma(blob, 0) == (blob, 0)
    with pytest.raises(ValueError, match="ELF64"):
        sass_yield.interleave_ffma(b"not a cubin" + bytes(64), 2)
    assert struct.calcsize("<QQ") == 16  # one sm_90 instruction
