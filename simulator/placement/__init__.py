"""Expert placement: EPLB's hierarchical and global balancing (``rebalance``), its packing and
replica steps, migration from a current placement, and synthetic expert loads (``loads``).

Pure numpy: load arrays in, ``phy2log`` / ``log2phy`` / ``logcnt`` out. May import ``spec`` only
(``contracts`` and ``traffic`` import ``placement.maps``); never the engine or SimPy.
"""
