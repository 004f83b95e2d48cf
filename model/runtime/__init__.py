"""The per-rank runtime: executes a plan file's schedule, layout and expert placement on real processes.

Each process builds its pipeline stages from the plan (``model.stage``), forms the process groups the
layout implies, walks its rank's action list of the plan's schedule unchanged (with the point-to-point
communication lowered from it by ``simulator.schedules``), runs expert parallelism with the plan's
placement, DualPipe's overlapped F&B pairs, ZeRO-1 over data parallelism with FP32 main gradients,
and times every action and sub-step under the simulator's trace names.

May import: ``kernels``, the model (``moeplan.model``), and the data-only ``simulator.spec``,
``simulator.contracts`` and ``simulator.schedules``. See docs/design/runtime.md.
"""
