"""Public entry points: ``model.from_hf_config`` and the module's forward contract."""

from __future__ import annotations

import json

import pytest
import torch

from moeplan import model
from moeplan.simulator.presets.models import tiny_moe


def _config_dict() -> dict:
    config = tiny_moe().to_hf_config()
    config["architectures"] = ["DeepseekV3ForCausalLM"]  # an unmodelled key, reported not fatal
    return config


def test_from_dict_and_from_path_build_the_same_model(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_config_dict()))
    a = model.from_hf_config(_config_dict(), model.ModelOptions(dtype=torch.float32))
    b = model.from_hf_config(tmp_path, model.ModelOptions(dtype=torch.float32))
    c = model.from_hf_config(tmp_path / "config.json", model.ModelOptions(dtype=torch.float32),
                             generator=torch.Generator().manual_seed(1))
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        out = a(ids)
        assert out.logits.shape == (2, 6, 512) and out.logits.dtype == torch.float32
        torch.testing.assert_close(out.logits, b(ids).logits, rtol=0, atol=0)  # default init is seeded
        assert not torch.allclose(out.logits, c(ids).logits)


def test_default_dtype_is_bf16_with_fp32_router() -> None:
    m = model.from_hf_config(_config_dict())
    assert m.layers["0"].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert m.layers["1"].mlp.gate.weight.dtype == torch.float32
    assert m.layers["1"].mlp.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert m(torch.arange(8).view(1, 8)).logits.dtype == torch.bfloat16


def test_meta_device_build_is_lazy() -> None:
    config = _config_dict() | {"hidden_size": 7168, "vocab_size": 129280}
    m = model.from_hf_config(config, device="meta")
    assert m.embed_tokens.weight.is_meta


def test_fp8_option_builds_fp8_linears() -> None:
    m = model.from_hf_config(_config_dict(), model.ModelOptions(dtype=torch.float32, linear_precision="fp8",
                                                                expert_backend="fp8"))
    assert m.layers["1"].self_attn.q_b_proj.fp8 is not None
    assert m.lm_head.fp8 is None  # the output head stays in high precision
    with torch.no_grad():
        assert torch.isfinite(m(torch.arange(8).view(1, 8)).logits).all()


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        model.from_hf_config(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="only MLA models"):
        model.from_hf_config({**_config_dict(), "kv_lora_rank": None})
    with pytest.raises(ValueError, match="linear_precision='fp16'"):
        model.ModelOptions(linear_precision="fp16")
    with pytest.raises(ValueError, match="fp8_kernel='kernels' supports fp8_block_size=128 only"):
        model.from_hf_config(_config_dict(), model.ModelOptions(linear_precision="fp8", fp8_kernel="kernels",
                                                                fp8_block_size=64))
