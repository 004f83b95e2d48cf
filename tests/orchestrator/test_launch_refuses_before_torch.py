"""``moeplan launch`` refuses what the runtime cannot run before importing torch (issue 23: a refusal within a
second or two; torch's import alone takes about 3 s of CPU here): the ranks' checks live torch-free in
``simulator.contracts.runtime_support``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("model,extra,message", [
    ("tiny-dense", [], "the runtime builds MLA models only"),
    ("tiny-moe", ["--dtype", "fp16"], "dtype='fp16' must be one of bf16, fp32"),
])
def test_a_refused_launch_never_imports_torch(tmp_path, model, extra, message):
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from moeplan.orchestrator.cli import app
        runner = CliRunner()
        assert runner.invoke(app, ["plan", "--model", {model!r}, "--cluster", "cpu", "--nodes", "1",
                                   "--out", {str(tmp_path / "p")!r}]).exit_code == 0
        result = runner.invoke(app, ["launch", {str(tmp_path / "p")!r}, *{extra!r}])
        print(result.exit_code, "torch" in sys.modules, result.stderr.strip())
    """)
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, check=False)
    code_, torch_loaded, line = out.stdout.strip().split(" ", 2)
    assert (code_, torch_loaded) == ("2", "False"), out.stdout + out.stderr
    assert message in line and line.startswith("moeplan: error:"), line
