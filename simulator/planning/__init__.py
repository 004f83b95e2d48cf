"""From inputs to a plan: simulate a step (``predict``), the whole run's phases and budget
(``run_model``, ``phase_layout``), the layout search (``search``) and the plan builder
(``planner``).

The only room that drives the engine. May import every other room of the simulator except
``report``; the orchestrator calls ``planner`` and writes what it returns.
"""
