"""Checkpoint naming conversions, FP8 checkpoints, strictness and stage-wise loading."""

from __future__ import annotations

import pytest
import torch

from moeplan.model import ModelOptions, StageSpec, Transformer, load_hf_state_dict
from moeplan.model.fp8 import quantize_blocks
from moeplan.model.hf_weights import from_internal, fused_to_published, published_to_fused, to_internal
from tests.model.hf_reference import derived_spec

F32 = ModelOptions(dtype=torch.float32)


def _model(seed: int = 0, spec=None, options=F32) -> Transformer:
    m = Transformer(spec or derived_spec(), options).eval()
    m.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for moe in m.moe_layers().values():
            moe.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return m


def _ids(spec, seed=0):
    return torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_published_names_follow_the_deepseek_checkpoint() -> None:
    m = _model()
    spec = m.spec
    published = from_internal(m.state_dict(), spec)
    mtp = spec.num_hidden_layers  # MTP depth 1 is layer 4 of the tiny model (61 for V3)
    for key in [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.15.gate_proj.weight",
        "model.layers.1.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.2.self_attn.kv_a_proj_with_mqa.weight", "model.layers.2.self_attn.q_a_layernorm.weight",
        f"model.layers.{mtp}.enorm.weight", f"model.layers.{mtp}.hnorm.weight", f"model.layers.{mtp}.eh_proj.weight",
        f"model.layers.{mtp}.shared_head.norm.weight", f"model.layers.{mtp}.shared_head.head.weight",
        f"model.layers.{mtp}.embed_tokens.weight", f"model.layers.{mtp}.mlp.experts.3.up_proj.weight",
    ]:
        assert key in published, key
    assert not any("gate_up_proj" in k or "tokens_per_expert" in k for k in published)
    assert published["model.layers.1.mlp.experts.15.gate_proj.weight"].shape == (spec.moe_intermediate_size,
                                                                                spec.hidden_size)


def test_roundtrips_are_lossless() -> None:
    m = _model()
    internal = m.state_dict()
    published = from_internal(internal, m.spec)
    back = to_internal(published, m.spec)
    assert set(back) == set(internal)
    assert all(torch.equal(back[k], internal[k]) for k in internal)
    fused = published_to_fused(published)
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    again = fused_to_published(fused)
    assert set(again) == set(published) and all(torch.equal(again[k], published[k]) for k in published)


def test_gate_up_fusion_puts_gate_rows_first() -> None:
    sd = {f"model.layers.1.mlp.experts.{e}.{p}.weight": torch.full((2, 3), float(10 * e + i))
          for e in range(2) for i, p in enumerate(["gate_proj", "up_proj", "down_proj"])}
    fused = published_to_fused(sd)["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.shape == (2, 4, 3)
    assert fused[1, :2].unique().item() == 10.0 and fused[1, 2:].unique().item() == 11.0


def test_load_into_fresh_model_reproduces_logits() -> None:
    src = _model(seed=1)
    dst = _model(seed=2)
    ids = _ids(src.spec)
    with torch.no_grad():
        assert not torch.allclose(src(ids).logits, dst(ids).logits)
        report = load_hf_state_dict(dst, from_internal(src.state_dict(), src.spec))
        assert report.other_stages == []
        torch.testing.assert_close(dst(ids).logits, src(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(dst(ids).mtp_logits[0], src(ids).mtp_logits[0], rtol=0, atol=0)


def test_fp8_block_quantised_checkpoint_dequantises() -> None:
    """Quantise every 2-D weight like DeepSeek's release (weight + weight_scale_inv), load, compare."""
    spec = derived_spec(hidden_size=256, intermediate_size=384, moe_intermediate_size=160, vocab_size=300,
                        num_hidden_layers=2)
    src = _model(seed=3, spec=spec)
    published = from_internal(src.state_dict(), spec)
    fp8_sd, dequantised = {}, {}
    for key, value in published.items():
        quantise = value.dim() == 2 and "embed" not in key and "head" not in key and "gate.weight" not in key
        if quantise:
            q, scale = quantize_blocks(value, 128)
            fp8_sd[key], fp8_sd[key + "_scale_inv"] = q, scale
            dequantised[key] = q.float() * torch.repeat_interleave(torch.repeat_interleave(scale, 128, 0), 128, 1)[
                : value.shape[0], : value.shape[1]]
        else:
            fp8_sd[key] = dequantised[key] = value
    from_fp8, from_dq = _model(seed=4, spec=spec), _model(seed=5, spec=spec)
    load_hf_state_dict(from_fp8, fp8_sd)
    load_hf_state_dict(from_dq, dequantised)
    ids = _ids(spec)
    with torch.no_grad():
        torch.testing.assert_close(from_fp8(ids).logits, from_dq(ids).logits, rtol=0, atol=0)
        rel = float((from_fp8(ids).logits - src(ids).logits).norm() / src(ids).logits.norm())
    assert 0 < rel < 0.1, rel


def test_fp8_weight_without_scale_is_rejected() -> None:
    m = _model()
    sd = from_internal(m.state_dict(), m.spec)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight_scale_inv is missing"):
        load_hf_state_dict(m, sd)


def test_strict_loading_names_the_problem() -> None:
    m = _model()
    sd = from_internal(m.state_dict(), m.spec)
    with pytest.raises(ValueError, match="unexpected=.*layers.2.self_attn.typo"):
        load_hf_state_dict(m, {**sd, "model.layers.2.self_attn.typo.weight": torch.zeros(1)})
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match="missing=.*norm.weight"):
        load_hf_state_dict(m, sd)
    sd["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="norm.weight: checkpoint shape"):
        load_hf_state_dict(m, sd)


def test_stage_loads_only_its_layers() -> None:
    full = _model(seed=6)
    spec = full.spec
    stage = Transformer(spec, F32, StageSpec(2, 4, has_embedding=False, has_head=True))
    report = load_hf_state_dict(stage, from_internal(full.state_dict(), spec))
    assert any(k.startswith("layers.0.") for k in report.other_stages)
    assert not any(k.startswith(("layers.2.", "layers.3.", "mtp.", "norm", "lm_head")) for k in report.other_stages)
    torch.testing.assert_close(stage.embed_tokens.weight, full.embed_tokens.weight)  # MTP's copy
    torch.testing.assert_close(stage.layers["3"].mlp.experts.down_proj, full.layers["3"].mlp.experts.down_proj)
