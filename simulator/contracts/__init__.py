"""The documents both halves of moeplan share: what the planner writes and the runtime reads.

Holds the plan file (``plan_file``), the predictions it carries (``predictions``), the expert
placement's JSON form (``placement``), the expert-load record the training runtime writes
(``expert_load``), the trace event (``trace``) and atomic writes (``atomic_write``). The input
specs they embed live next door in ``simulator.spec``.

May import: pydantic, numpy, ``spec``, and the pure data of ``accounting`` (per-rank memory),
``schedules`` (action lists) and ``placement.maps`` (placement arrays). Never the engine, SimPy,
``planning``, ``costs`` or torch: the runtime and the launcher read a plan without loading the
simulator (tests/simulator/contracts/test_imports.py checks this through ``sys.modules``).
"""
