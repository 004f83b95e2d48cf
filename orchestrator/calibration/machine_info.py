"""What the measuring machine is: processor, logical CPUs, RAM and load (Linux ``/proc``; placeholders elsewhere)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_facts() -> dict:
    """Processor name, logical CPUs and RAM of this machine (Linux /proc; placeholders elsewhere)."""
    cpu, mem = platform.processor() or "unknown CPU", 0
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
        mem = int(next(x.split()[1] for x in Path("/proc/meminfo").read_text().splitlines()
                       if x.startswith("MemTotal:"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "memory_bytes": mem or 2**30}


def load_average() -> str:
    """The 1, 5 and 15-minute load averages (Linux), or "" elsewhere."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""
