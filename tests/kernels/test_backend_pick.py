"""The auto dispatch's pick among timed candidates (``kernels.fp8_gemm.pick_faster``): the fastest, except that a
near-tie goes the same way every time (``PICK_PREFERENCE`` within ``PICK_MARGIN``), refusing candidates dropped."""

from __future__ import annotations

import types

import pytest

from moeplan.kernels import fp8_gemm


@pytest.fixture
def timed(monkeypatch):
    """Candidates whose 'time' is the number they return: do_bench calls them and reports it."""
    monkeypatch.setattr(fp8_gemm, "_BACKEND_CACHE", {})
    bench = types.SimpleNamespace(do_bench=lambda fn, rep, return_mode: fn())
    monkeypatch.setattr(fp8_gemm, "triton", types.SimpleNamespace(testing=bench))

    def pick(**ms):
        def candidate(value):
            if value is None:
                def refuse():
                    raise ValueError("layout refused")
                return refuse
            return lambda: value
        return fp8_gemm.pick_faster(tuple(sorted(ms.items(), key=str)), {k: candidate(v) for k, v in ms.items()})
    return pick


def test_a_clear_winner_is_picked_whatever_the_preference(timed):
    assert timed(triton=1.0, gluon=1.2, torch=1.1) == "triton"
    assert timed(triton=2.0, gluon=1.5, torch=1.0) == "torch"


def test_a_near_tie_goes_to_the_preferred_candidate_every_time(timed):
    margin = fp8_gemm.PICK_MARGIN
    assert timed(triton=2.0, torch=1.0, gluon=1.0 + 0.9 * margin) == "gluon"  # within the margin: ours
    assert timed(triton=2.0, torch=1.0, gluon=1.0 + 1.1 * margin) == "torch"  # beyond it: the faster
    assert timed(triton=1.0, torch=1.0) == "torch"  # an exact tie: the earlier in PICK_PREFERENCE, not in the dict
    assert timed(**{"128": 1.0, "256": 1.01}) == "256"  # the Gluon kernel's wider tile


def test_refusing_candidates_are_dropped_and_unlisted_names_come_last(timed):
    assert timed(triton=1.5, gluon=None, torch=1.0) == "torch"
    assert timed(other=1.0, triton=1.0) == "triton"
    assert timed(other=1.0, triton=1.5) == "other"


def test_the_pick_is_made_once_per_key(timed, monkeypatch):
    calls = []
    first = fp8_gemm.pick_faster(("k",), {"triton": lambda: calls.append(1) or 1.0})
    again = fp8_gemm.pick_faster(("k",), {"gluon": lambda: 0.1})
    assert first == again == "triton" and len(calls) == 1 + fp8_gemm.PICK_ROUNDS
