"""Calibration: micro-benchmarks at a plan's shapes and the cost tables they make (``moeplan calibrate``), and
tables updated from a measured run's per-op durations (``moeplan check --recalibrate``).

Measurement code shared with ``benchmarks/`` lives here (GEMMs, attention, copies and the optimizer in
``compute``; collectives in ``links``; memory-bound kernel classes in ``memory_cases`` / ``memory_classes``;
the host's per-op cost and op counts in ``host_ops``; timing in ``timing``).

May import: ``simulator``, ``model``, ``kernels``.
"""
