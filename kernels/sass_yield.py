"""Let the warp scheduler switch warps inside the promotion's FFMA run (a post-pass on sm_90 SASS).

ptxas sorts a promotion's 64 FFMAs by their scale register and marks the scale operand for the
operand-reuse cache; an instruction that leaves a value in that cache also tells the scheduler not
to switch to another warp after it (the reuse cache belongs to the warp on the issue port). So a
math warp issues its FFMAs back to back while the other warpgroup's warp on the same scheduler
waits with its MMA issue. DeepGEMM's README describes the remedy: on a subset of those FFMAs clear
the reuse flag and allow the switch. This module does that on the compiled cubin, with no other
change to the code: each ``every``-th FFMA (three register sources) of every kernel text section
loses its reuse flags and gets its yield bit cleared.

The encoding facts (sm_90, 128-bit instructions as two little-endian 64-bit words), read off
``cuobjdump -sass`` of our own kernel (tests/kernels/test_sass_yield.py checks them):
* bits 0-11 of the low word are 0x223 for ``FFMA Rd, Ra, Rb, Rc`` and for no other instruction;
* bits 58-61 of the high word are the operand-reuse flags (0x2 for ``Rb.reuse``);
* bit 45 of the high word is set on every FFMA ptxas emits in this kernel (no switch), clear on
  instructions after which the scheduler may switch warps.
"""

import struct

FFMA_OPCODE = 0x223
OPCODE_MASK = 0xFFF
NO_YIELD_BIT = 1 << 45
REUSE_BITS = 0xF << 58


def text_sections(elf: bytes):
    """(offset, size) of each ``.text.*`` section of an ELF64 little-endian file (a cubin)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        label = elf[strtab + name: elf.index(b"\0", strtab + name)]
        if label.startswith(b".text."):
            yield offset, size


def interleave_ffma(cubin: bytes, every: int) -> tuple[bytes, int]:
    """The cubin with each ``every``-th FFMA free to yield (reuse flags cleared), and how many
    FFMAs changed. ``every = 0`` changes nothing."""
    out = bytearray(cubin)
    changed = seen = 0
    if every <= 0:
        return bytes(out), 0
    for offset, size in text_sections(cubin):
        for pos in range(offset, offset + size - 15, 16):
            lo, hi = struct.unpack_from("<QQ", out, pos)
            if lo & OPCODE_MASK != FFMA_OPCODE:
                continue
            seen += 1
            if seen % every:
                continue
            struct.pack_into("<Q", out, pos + 8, hi & ~(NO_YIELD_BIT | REUSE_BITS))
            changed += 1
    return bytes(out), changed
