"""A checkpoint is read as data only (``model.runtime.checkpoint_reader``): DCP's metadata unpickled with an
allowlist, bytes items refused; a real checkpoint still loads."""

from __future__ import annotations

import contextlib
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from moeplan.model.runtime.checkpoint_reader import UnsafeCheckpointError, load_data_only


def _save(path, state):
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _load(path, state):
    load_data_only(state, str(path), no_dist=True)


def test_a_checkpoint_of_tensors_loads(tmp_path):
    saved = {"w": torch.randn(4, 3).to(torch.bfloat16), "step": torch.tensor(7), "m": torch.zeros(5)}
    _save(tmp_path / "ck", saved)
    state = {k: torch.empty_like(v) for k, v in saved.items()}
    _load(tmp_path / "ck", state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM",))


def test_metadata_that_names_another_global_is_refused_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "ck", {"w": torch.zeros(2)})
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        _load(tmp_path / "ck", {"w": torch.zeros(2)})
    assert not (tmp_path / "BOOM").exists()
    with contextlib.suppress(CheckpointException, Exception):  # DCP's own reader on the same folder runs it: why this module exists
        dcp.load({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    assert (tmp_path / "BOOM").exists()


def test_a_pickled_item_is_refused(tmp_path):
    _save(tmp_path / "ck", {"w": torch.zeros(2), "note": "a python object"})  # DCP stores it as bytes
    with pytest.raises(UnsafeCheckpointError, match="note"):
        _load(tmp_path / "ck", {"w": torch.zeros(2), "note": ""})
