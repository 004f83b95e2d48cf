"""MoE traffic: which experts, GPUs and nodes a token reaches under node-limited routing
(``routing``), and the all-to-all bytes and time of one MoE layer per GPU (``all_to_all``).

Pure numpy. May import ``spec`` and ``placement.maps``; never ``planning``, the engine or SimPy.
"""
