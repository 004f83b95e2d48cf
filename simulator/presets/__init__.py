"""Named models, clusters and training recipes: functions returning specs, each citing its source.

May import: ``spec``.
"""
