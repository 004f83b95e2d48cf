"""The event-level simulator (SimPy): one training step, a process per pipeline rank, links as objects,
every interval a trace event. ``build`` turns inputs into per-unit costs; ``step`` runs them.

May import: ``spec``, ``schedules``, ``accounting``, ``placement``, ``traffic``, ``contracts``, ``costs``.
Only ``planning`` drives it.
"""
