"""Techniques a plan may leave out, to reproduce a historical setup (issue 21, capability 4).

``moeplan plan --techniques no-dualpipe,no-fp8`` plans as if those techniques did not exist: the search
never tries an excluded schedule, and the run's precision or layout is held where the technique leaves
it. Kernel eras are the cost tables' (``--cost-tables``, ``costs.tables.NAMED_TABLES``); together they
describe a setup of an earlier year, e.g. ``--techniques no-dualpipe,no-fp8 --cost-tables
hopper-bf16-fa2-2023``. Each name maps onto settings the plan already has, so nothing else needs to know
about techniques: ``overrides`` are ``--set`` lines, ``schedules`` the kinds the search may try, and
``conflict`` says (in one line) when the user's own settings contradict them. The plan records the names.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeplan.simulator.schedules.registry import SCHEDULE_KINDS

# name -> (what it leaves out, schedule kinds it excludes, --set lines it applies)
TECHNIQUES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "no-dualpipe": ("DualPipe and DualPipeV (DeepSeek-V3, 2024)", ("dualpipe", "dualpipev"), ()),
    "no-zero-bubble": ("zero-bubble 1F1B (Qi et al. 2023)", ("zb1p",), ()),
    "no-interleaved": ("interleaved 1F1B (Narayanan et al. 2021)", ("interleaved",), ()),
    "no-fp8": ("FP8 GEMMs: the run is BF16", (), ('training.precision="bf16"',)),
    "no-cp": ("context parallelism: cp = 1", (), ("parallel.cp=1",)),
    "no-ep": ("expert parallelism: ep = 1, every GPU holds every expert", (), ("parallel.ep=1",)),
}


@dataclass(frozen=True)
class Techniques:
    """The techniques left out, by name (sorted; empty = every technique available)."""

    off: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Techniques:
        """``no-dualpipe,no-fp8`` -> ``Techniques``; ``ValueError`` naming an unknown name."""
        if not text:
            return cls()
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in TECHNIQUES]
        if unknown:
            raise ValueError(f"--techniques {unknown[0]!r}: unknown (choose from {', '.join(TECHNIQUES)})")
        return cls(tuple(sorted(set(names))))

    @property
    def schedules(self) -> tuple[str, ...]:
        """The schedule kinds the search may try."""
        excluded = {k for n in self.off for k in TECHNIQUES[n][1]}
        return tuple(k for k in SCHEDULE_KINDS if k not in excluded)

    @property
    def overrides(self) -> list[str]:
        """``--set`` lines that hold the run where the techniques leave it (applied before the user's own)."""
        return [line for n in self.off for line in TECHNIQUES[n][2]]

    def phase_overrides(self, phases: int) -> list[str]:
        """``--set`` lines for each of ``phases`` training phases (``no-cp``: a long-context phase keeps cp = 1
        instead of choosing its own, ``planning.phase_layout``)."""
        return [f"training.phases.{i}.cp=1" for i in range(phases)] if "no-cp" in self.off else []

    def conflict(self, schedule: str | None, precision: str, cp: int, ep: int,
                 phase_cps: tuple[int | None, ...] = ()) -> str | None:
        """Why settings of the plan contradict the techniques (``schedule`` None: the search chooses it)."""
        bad_phase = next((i for i, c in enumerate(phase_cps) if c not in (None, 1)), None)
        if "no-cp" in self.off and bad_phase is not None:
            return f"--techniques no-cp contradicts training.phases.{bad_phase}.cp={phase_cps[bad_phase]}"
        for name in self.off:
            _, kinds, _ = TECHNIQUES[name]
            if schedule in kinds:
                return f"--techniques {name} excludes schedule={schedule}"
        checks = {"no-fp8": precision == "fp8", "no-cp": cp != 1, "no-ep": ep != 1}
        bad = next((n for n in self.off if checks.get(n)), None)
        if bad is None:
            return None
        value = {"no-fp8": f"precision={precision}", "no-cp": f"cp={cp}", "no-ep": f"ep={ep}"}[bad]
        return f"--techniques {bad} contradicts {value}"
