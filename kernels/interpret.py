"""Running the kernels under the Triton interpreter (``TRITON_INTERPRET=1``, CPU CI).

Two interpreter limits are handled here rather than in each kernel:
* bf16 arithmetic is wrong there, so kernels take an ``UPCAST`` constexpr (``INTERPRET``) and move
  to fp32 right after ``tl.load``; on a GPU they keep bf16 operands for the tensor cores.
* Triton 3.6's interpreter turns a scalar into an index with ``int()`` of a one-element array, which
  NumPy >= 2.4 refuses, so ``range(lo, hi)`` with run-time bounds fails. ``install()`` swaps in
  ``.item()``; it touches only the interpreter and only when it is on.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def install() -> None:
    """Patch the interpreter's scalar ``__index__`` once (a no-op without TRITON_INTERPRET=1)."""
    if not INTERPRET:
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_moeplan_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._moeplan_index_fix = True


install()
