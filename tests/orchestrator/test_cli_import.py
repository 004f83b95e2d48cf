"""Every command shares the CLI's imports: a bad flag to any of them fails in a second or two only if the
CLI itself loads neither torch nor Ray (the commands that need them import them when they run)."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_loads_neither_torch_nor_ray():
    code = "import sys, moeplan.orchestrator.cli; print(sorted(m for m in ('torch', 'ray', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
