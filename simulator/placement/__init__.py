"""Expert placement: EPLB's hierarchical and global balancing (``rebalance``), its packing and
replica steps, migration from a current placement, and synthetic expert loads (``loads``).

Pure numpy: load arrays in, ``phy2log`` / ``log2phy`` / ``logcnt`` out. May import ``spec`` and
``contracts``; nothing here imports ``traffic``, ``planning``, the engine or SimPy.
"""
