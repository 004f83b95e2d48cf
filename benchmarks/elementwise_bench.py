"""Memory-bound kernels of one DeepSeek-V3 layer at their real shapes: achieved bytes/s and fraction of HBM.

    python benchmarks/elementwise_bench.py    # CUDA: simulator/costs/data/<gpu>-elementwise.json and the md
    python benchmarks/elementwise_bench.py --device cpu --small --out /tmp/ew.json --md /tmp/ew.md   # smoke run
    python benchmarks/elementwise_bench.py --refit simulator/costs/data/h100-elementwise.json   # no timing

``--refit FILE`` times nothing: it counts every measured pass's bytes again as the simulator counts them now
(``memory_classes.case_bytes``) and fits each again through its stored seconds (``fit_pass``), writing FILE back
(and ``--md`` where given). The seconds stay as measured; the file's ``refit`` says when and why.

Every kernel class of ``simulator.costs.elementwise`` (RMSNorms, latent norms, residual adds, RoPE,
FP8 casts, SwiGLU, router, permute, combine, embedding, cross-entropy) runs at V3's shapes with 4096
tokens per micro-batch, through the implementation the cost tables take for it (and, beside it, the
alternative; ``orchestrator/calibration/memory_cases.py``). Bytes are the class's *ideal* bytes as the
simulator counts them (``layer_bytes_per_token`` / ``end_bytes_per_token`` times the tokens: every
input read once, every output written once). A per-token class is timed at a second size too (a quarter of the
tokens, ``memory_classes.fit_pass``): the line through the two points gives ``fixed_s``, the seconds a call costs
whatever its size (clamped at 0), and ``hbm_frac``, the fraction of the GPU's datasheet HBM bandwidth its bytes
move at beside it (with ``fixed_s``, the main point's seconds again): what ``CostTables.memory_fracs`` and
``memory_fixed_s`` price the class at. A once-a-step class keeps one size: ``hbm_frac`` = bytes / seconds / the
datasheet. The datasheet is
the cluster preset of the device it runs on (``gpu_preset_for``, by ``presets.clusters.gpu_for_device``:
an H100, 3.35 TB/s; an H800, the H100's HBM3 at 3.35 TB/s, [H100-DS] and [H800]; an H200, 4.8 TB/s,
[H200-DS]); on the CPU or a GPU the presets lack, the H200's, as ``hbm_source`` says. The default ``--out``
is the packaged file the tables take for that GPU (``memory_kernels.elementwise_file``: an H100 or H800
writes ``h100-elementwise.json``, an H200 ``h200-elementwise.json``). Forward and backward are timed apart
(backward on one kept autograd graph).
Times: median of ``--reps`` runs after warm-up, each after a 256 MiB read that flushes the L2, by
CUDA events (the L2 is evicted by reading the buffer, so no dirty line is written back inside the
timed kernel). Triton kernels are skipped, with the reason recorded, where no CUDA GPU runs them."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from moeplan.kernels.triton_compat import HAVE_TRITON
from moeplan.orchestrator.calibration.memory_cases import CASES
from moeplan.orchestrator.calibration.memory_classes import FIT_DIVISOR, case_bytes, fit_pass, measure
from moeplan.simulator.contracts.atomic_write import write_atomic
from moeplan.simulator.costs.memory_kernels import ELEMENTWISE_FILES, elementwise_file
from moeplan.simulator.presets.clusters import gpu_for_device, h200_gpu
from moeplan.simulator.presets.models import deepseek_v3, tiny_moe
from moeplan.simulator.spec.hardware import GpuSpec

log = logging.getLogger(__name__)

COSTS = Path("simulator/costs")  # where the packaged measurement files live (ELEMENTWISE_FILES)
DEFAULT_MD = Path("docs/results/elementwise.md")
TOKENS, SMALL_TOKENS = 4096, 64


def gpu_preset_for(device_name: str) -> tuple[GpuSpec, str]:
    """(the cluster preset's GPU, where its HBM bandwidth comes from) for a device name; on the CPU or a GPU
    the presets lack, the H200's, saying so."""
    known = gpu_for_device(device_name)
    gpu = known or h200_gpu()
    source = f"simulator.presets.clusters.gpu_for_device ({gpu.name} datasheet)"
    return gpu, source if known else f"{source}: {device_name!r} is none of the presets' GPUs, the H200's taken"


def _cell(p: dict | None) -> str:
    """A pass's cells: MB, us, TB/s, then the second size's us, the fixed us (* where clamped) and the HBM
    fraction beside it (``memory_classes.fit_pass``)."""
    if p is None:
        return "| — | — | — | — | — | — "
    small = "—" if p.get("small_s") is None else f"{p['small_s'] * 1e6:,.1f}"
    fixed = "—" if p.get("fixed_s") is None else f"{p['fixed_s'] * 1e6:,.1f}" + ("*" if p["fixed_clamped"] else "")
    return (f"| {p['bytes'] / 1e6:,.1f} | {p['s'] * 1e6:,.1f} | {p['bytes_per_s'] / 1e12:.2f} | {small} | {fixed} "
            f"| {p['hbm_frac']:.1%} ")


def markdown(result: dict) -> str:
    lines = [
        "# Memory-bound kernels of one DeepSeek-V3 layer",
        "",
        f"`{result['command']}` on {result['device']} ({result['date']}; torch {result['torch']}, triton "
        f"{result['triton']}), {result['tokens']} tokens per micro-batch. Bytes are each class's ideal bytes as "
        "`simulator/costs/elementwise.py` counts them (inputs read once, outputs written once); HBM % is of "
        f"{result['hbm_bytes_per_s'] / 1e12:.1f} TB/s ({result['hbm_source']}). Rows marked *table* are what "
        f"the cost tables take (`{result['out']}`); the others are measured beside them. A per-token class is timed "
        f"again at {result.get('small_tokens')} tokens (*us at ¼*): the line through the two points gives the fixed "
        "seconds a call (*fixed us*, its intercept; * where clamped to 0, or to what leaves the bytes at most the "
        "datasheet) and the HBM fraction of the rest, which together give back the main point's seconds.",
        "",
        *([f"Bytes counted again and refitted through the seconds as measured (`--refit`): "
           f"{'; '.join(result['refit'])}", ""] if result.get("refit") else []),
        "| class | implementation | table | shape | fwd MB | fwd us | fwd TB/s | fwd us at ¼ | fwd fixed us | fwd HBM "
        "| bwd MB | bwd us | bwd TB/s | bwd us at ¼ | bwd fixed us | bwd HBM |",
        "|---|---|---|---|" + "---:|" * 12,
    ]
    for e in result["kernels"]:
        if e["skipped"]:
            lines.append(f"| {e['kernel']} | {e['implementation']} | {'table' if e['in_table'] else ''} | {e['shape']} "
                         f"| skipped: {e['skipped']} " + "|" * 12)
            continue
        lines.append(f"| {e['kernel']} | {e['implementation']} | {'table' if e['in_table'] else ''} | {e['shape']} "
                     f"{_cell(e['fwd'])}{_cell(e['bwd'])}|")
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def refit(result: dict, why: str) -> dict:
    """``result`` (a file this benchmark wrote) with each measured pass's bytes counted again (``case_bytes``)
    and fitted again through its stored seconds (``fit_pass``); the shapes as the cases name them now. A row
    whose case is gone is kept as it was."""
    spec = {"deepseek-v3": deepseek_v3, "tiny-moe": tiny_moe}[result["model"]]()
    cases = {(c.kernel, c.implementation): c for c in CASES}
    out = dict(result, kernels=[])
    for entry in result["kernels"]:
        case = cases.get((entry["kernel"], entry["implementation"]))
        entry = dict(entry)
        if case is not None and entry.get("skipped") is None:
            main_bytes = case_bytes(case, spec, result["tokens"])
            small = entry.get("small_tokens")
            small_bytes = case_bytes(case, spec, small) if small else None
            for key in ("fwd", "bwd"):
                p = entry.get(key)
                if p is None:
                    continue
                second = ((getattr(small_bytes, f"{key}_bytes"), p["small_s"])
                          if small_bytes is not None and p.get("small_s") is not None else None)
                fitted = fit_pass(getattr(main_bytes, f"{key}_bytes"), p["s"], result["hbm_bytes_per_s"], second)
                entry[key] = {k: v for k, v in fitted.items() if k in p or v is not None}  # an older file's fields
            entry["shape"] = case.shape(spec, result["tokens"])
        out["kernels"].append(entry)
    out["refit"] = [*result.get("refit", []), why]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default: the packaged file of the device's GPU, "
                             f"{' or '.join(str(COSTS / f) for f in ELEMENTWISE_FILES.values())}")
    parser.add_argument("--md", type=Path, default=ROOT / DEFAULT_MD)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help=f"tiny model (tiny_moe) and {SMALL_TOKENS} tokens")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per pass (default 100 on CUDA, 3 on CPU)")
    parser.add_argument("--refit", type=Path, default=None, metavar="FILE",
                        help="time nothing: count FILE's bytes again and refit its stored seconds (module docstring)")
    parser.add_argument("--why", default="", help="with --refit: what changed in the byte count (kept in the file)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.refit is not None:
        if not args.why:
            parser.error("--refit needs --why: what changed in the byte count")
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        try:
            text = args.refit.read_text()
            result = refit(json.loads(text), f"{stamp}: {args.why}")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # no file, not JSON, or not this benchmark's
            parser.error(f"--refit {args.refit}: not a file of this benchmark ({type(exc).__name__}: {exc})")
        second = (text.splitlines() + ["", ""])[1]
        indent = len(second) - len(second.lstrip()) or 1  # as the file was laid out
        write_atomic(args.out or args.refit, json.dumps(result, indent=indent) + "\n")
        if args.md.resolve() != (ROOT / DEFAULT_MD).resolve():
            write_atomic(args.md, markdown(result))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (for a smoke run: --device cpu --small --out ... --md ...)")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpu, hbm_source = gpu_preset_for(device_name)
    packaged = [COSTS / f for f in ELEMENTWISE_FILES.values()]
    if args.device == "cpu" and (args.out is None or args.out.resolve() in {(ROOT / f).resolve() for f in packaged}
                                 or args.md.resolve() == (ROOT / DEFAULT_MD).resolve()):
        parser.error(f"--device cpu writes no measurement to {', '.join(map(str, packaged))} or {DEFAULT_MD}: "
                     "give --out and --md")
    args.out = args.out or ROOT / COSTS / elementwise_file(gpu.name)
    spec, tokens = (tiny_moe(), SMALL_TOKENS) if args.small else (deepseek_v3(), TOKENS)
    reps = args.reps or (100 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    entries = []
    for case in CASES:
        entries.append(measure(case, spec, tokens, device, reps, gpu.hbm_bytes_per_s))
        log.info(json.dumps(entries[-1]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    argv = " ".join(sys.argv[1:])
    result = {
        "what": "memory-bound kernel classes of one DeepSeek-V3 layer (simulator/costs/elementwise.py): ideal bytes, "
                "median seconds, bytes/s, and the fixed seconds a call with the fraction of the datasheet HBM "
                "bandwidth of the rest (fitted over a second size, small_tokens), forward and backward",
        "command": f"python benchmarks/elementwise_bench.py{' ' + argv if argv else ''}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if HAVE_TRITON else None,
        "model": spec.name, "tokens": tokens, "small_tokens": tokens // FIT_DIVISOR, "reps": reps,
        "hbm_bytes_per_s": gpu.hbm_bytes_per_s, "hbm_source": hbm_source,
        "out": _shown(args.out),
        "kernels": entries,
    }
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    write_atomic(args.md, markdown(result))


if __name__ == "__main__":
    main()
