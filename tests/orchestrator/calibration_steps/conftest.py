"""The tiny plan (pp 2, 1F1B) and its simulated per-rank trace, as ``tests/orchestrator/test_recalibrate.py`` makes it."""

from tests.orchestrator.test_recalibrate import planned  # noqa: F401 (a fixture)
