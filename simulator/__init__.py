"""The planning half of moeplan: specs in, a simulated and priced plan out. Never imports torch.

Rooms, bottom to top (a room imports only rooms listed before it; tests/test_house.py checks it):
``spec`` (what the user chose) -> ``presets``, ``schedules`` -> ``accounting`` -> ``placement`` ->
``traffic`` -> ``contracts`` (the plan file and the documents the runtime shares) -> ``costs`` ->
``engine`` (SimPy) -> ``planning`` -> ``report``. docs/design/architecture.md draws it.
Imports nothing itself; each room says what it may import.
"""
