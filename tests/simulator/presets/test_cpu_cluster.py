"""The cpu cluster preset and its measured cost tables: the preset is read from the measurement file,
every table entry names its measurement, the tiny model's shapes are measured exactly and priced at
their measured times, and the precisions field refuses what the tables do not price."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from pydantic import ValidationError

from moeplan.simulator.costs.kernels import gemm_s
from moeplan.simulator.costs.machine import bytes_moved
from moeplan.simulator.costs.tables import CPU_TABLE_FILES, CostTables, default_tables, named_tables
from moeplan.simulator.engine.unit_costs import attention_shapes
from moeplan.simulator.presets.clusters import CLUSTER_PRESETS, cpu, cpu_measurement
from moeplan.simulator.presets.models import tiny_moe

TABLES = tuple(CPU_TABLE_FILES)


def _path(name: str) -> Path:
    return Path(str(files("moeplan.simulator.costs").joinpath(CPU_TABLE_FILES[name])))


def test_the_preset_is_listed_and_reads_the_measurement_file():
    assert CLUSTER_PRESETS["cpu"] is cpu
    c, mc = cpu(), cpu_measurement()["machine"]
    assert c.name == "cpu" and c.nodes == 1 and cpu(3).num_gpus == 3 * mc["cores"]
    assert c.node.gpus_per_node == mc["cores"] and c.gpu.sm_count == mc["threads_per_process"] == 1
    assert c.gpu.bf16_flops_per_s == mc["peak_flops_per_s"] and c.gpu.hbm_bytes_per_s == mc["memory_bytes_per_s"]
    assert c.gpu.hbm_bytes == mc["memory_bytes"] // mc["cores"]
    assert 0 < c.node.memory_reserved_bytes == mc["process_rss_bytes"] < c.gpu.hbm_bytes
    p2p = [f for f in cpu_measurement()["links"] if f["collective"] == "send_recv" and f["processes"] == 2]
    assert len(p2p) == 1 and c.node.nvlink_bytes_per_s == c.node.nic_bytes_per_s == p2p[0]["bytes_per_s"]
    assert c.node.nvlink_spec_bytes_per_s >= c.node.nvlink_bytes_per_s


@pytest.mark.parametrize("name", TABLES)
def test_the_tables_load_from_their_file_and_every_entry_names_its_measurement(name):
    t = named_tables(name, "CPU-process")
    assert t == CostTables.from_file(_path(name)) and t.name == name
    assert t.machine is not None and t.machine.dtype == {"cpu": "float32", "cpu-bf16": "bfloat16"}[name]
    assert t.machine.threads_per_process == 1 and t.precisions == ("bf16",) and t.comm_sms == 0
    stamp = f"[CPU] cpu_tables.py {t.machine.date}:"
    sources = ([p.source for p in t.gemm] + [p.source for p in t.memory_kernels] + [f.source for f in t.links]
               + [t.attention_source, t.memory_source, t.collective_source])
    assert all(s.startswith(stamp) for s in sources), [s for s in sources if not s.startswith(stamp)][:3]
    assert {(f.collective, f.processes) for f in t.links} >= {
        (c, 2) for c in ("send_recv", "all_to_all", "all_reduce", "reduce_scatter", "all_gather")}
    assert t.attention_by_seq and {p.kernel for p in t.memory_kernels} >= {"rms_norm", "swiglu", "permute", "combine",
                                                                           "optimizer"}


def test_the_cpu_cluster_defaults_to_the_fp32_tables_and_refuses_fp8():
    t = default_tables(cpu().gpu.name)
    assert t.name == "cpu" and t is named_tables("cpu", "CPU-process")
    assert t.precision_error("bf16") is None
    assert t.precision_error("fp8") == "precision=fp8 is not priced by cost tables 'cpu' (they price bf16)"
    assert t.comm_sms_error(cpu().gpu.sm_count) is None  # no SM reserved: all of the one thread computes
    assert default_tables("H200-SXM").precision_error("fp8") is None


@pytest.mark.parametrize("name", TABLES)
def test_every_tiny_moe_linear_is_measured_and_priced_at_its_measured_time(name):
    """The simulator's nearest-shape lookup finds the exact shape, and the peak bounds every point, so the
    time it prices is the measured one: 2 m n k groups / measured rate."""
    t, gpu, m = named_tables(name, "CPU-process"), cpu().gpu, tiny_moe()
    attn, up = attention_shapes(m)
    linears = attn + up + [(m.hidden_size, 2 * m.intermediate_size), (m.intermediate_size, m.hidden_size),
                           (m.hidden_size, m.vocab_size), (m.hidden_size, m.n_routed_experts)]
    points = {(p.m, p.n, p.k, p.groups): p for p in t.gemm}
    for tokens in (64, 256):
        for i, o in linears:
            for shape in ((tokens, o, i), (tokens, i, o), (o, i, tokens)):
                p = points[(*shape, 1)]
                flops = 2.0 * shape[0] * shape[1] * shape[2]
                assert gemm_s(t, gpu, "bf16", *shape) == pytest.approx(flops / p.flops_per_s)
    assert max(p.flops_per_s for p in t.gemm) <= gpu.bf16_flops_per_s
    # the routed experts without expert parallelism: forward, input and weight gradient of gate+up and down
    h, f, g = m.hidden_size, m.moe_intermediate_size, m.n_routed_experts
    per = 64 * m.num_experts_per_tok // g
    for shape in ((per, 2 * f, h), (per, h, f), (per, h, 2 * f), (per, f, h), (2 * f, h, per), (h, f, per)):
        p = points[(*shape, g)]
        assert gemm_s(t, gpu, "bf16", *shape, groups=g) == pytest.approx(2.0 * g * shape[0] * shape[1] * shape[2]
                                                                        / p.flops_per_s)


def test_the_link_fits_hold_their_points_and_count_bytes_per_collective():
    t = named_tables("cpu", "CPU-process")
    for f in t.links:
        sizes = [p.buffer_bytes for p in f.points]
        assert sizes == sorted(sizes) and f.seconds(sizes[0]) < f.seconds(sizes[-1])
        assert f.seconds(sizes[0]) == pytest.approx(f.latency_s + bytes_moved(f.collective, sizes[0], f.processes)
                                                    / f.bytes_per_s)
    assert bytes_moved("all_reduce", 1000, 4) == 1500 and bytes_moved("send_recv", 1000, 4) == 1000
    assert bytes_moved("all_gather", 1000, 2) == bytes_moved("reduce_scatter", 1000, 2) == 500


def test_precisions_are_checked_against_the_gemm_points():
    data = named_tables("cpu", "CPU-process").model_dump(mode="json")
    assert CostTables.model_validate(data | {"precisions": ["bf16"]}).precisions == ("bf16",)
    with pytest.raises(ValidationError, match="has no fp8 point; the tables need GEMM throughput for bf16 and fp8"):
        CostTables.model_validate(data | {"precisions": ["bf16", "fp8"]})
    with pytest.raises(ValidationError, match=r"precisions=\['fp8'\] must include bf16"):
        CostTables.model_validate(data | {"precisions": ["fp8"]})
    old = default_tables("H800-SXM5").model_dump(mode="json")
    for key in ("precisions", "machine", "links"):  # files written before these fields load as before
        old.pop(key)
    assert CostTables.model_validate(old).precisions == ("bf16", "fp8")
