"""What a user reads: the plan as one self-contained HTML page (``plan_html``, ``plan_tables``,
``timeline``) and a placement's before/after numbers and figures (``placement_summary``,
``placement_figures``).

Pure: returns figures, tables and numbers; the CLI writes them. May import every room of the
simulator; nothing imports ``report`` but the orchestrator.
"""
