"""Exact accounting: parameters, FLOPs, activations and memory per pipeline rank, the stage split and
context parallelism. Closed forms checked against transformers; no simulation.

May import: ``spec`` and ``schedules`` (in-flight micro-batches come from the schedule).
"""
