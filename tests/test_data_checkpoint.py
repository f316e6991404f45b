"""Differential checkpoints: delta restore equals full restore, chain bookkeeping, atomicity, errors."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_loader import make_plan, same, take

from thruput.data import DataError, DeltaCheckpointer, Loader
from thruput.data.checkpoint import apply_delta, make_delta

leaves = st.one_of(st.integers(-(2**40), 2**40), st.booleans(), st.text(max_size=5), st.none(), st.floats(allow_nan=False))
keys = st.text(alphabet="ab/~c", min_size=1, max_size=4)
states = st.recursive(leaves, lambda inner: st.dictionaries(keys, inner, max_size=4), max_leaves=12).filter(
    lambda s: isinstance(s, dict)
)


@settings(max_examples=200, deadline=None)
@given(states, states)
def test_delta_round_trips_any_nested_state(base, state):
    delta = json.loads(json.dumps(make_delta(base, state)))  # what the file holds
    assert apply_delta(base, delta) == state


def test_delta_restore_equals_full_restore_and_resumes_bitwise(tmp_path):
    plan = make_plan(world_size=2)
    with Loader(plan, rank=0, backend="inline") as loader:
        reference = take(loader, 14)
    delta_ckpt = DeltaCheckpointer(tmp_path / "delta", every=2, full_every=3)
    full_ckpt = DeltaCheckpointer(tmp_path / "full", every=2, full_every=0)  # every save is a snapshot
    with Loader(plan, rank=0, backend="inline") as loader:
        for _ in range(9):
            next(loader)
            if delta_ckpt.maybe_save(loader.state_dict()) is not None:
                expected = loader.state_dict()
            full_ckpt.maybe_save(loader.state_dict())
    kinds = [kind for _, kind, _ in delta_ckpt.files()]
    assert kinds == ["full", "delta", "delta", "delta"]  # steps 2 4 6 8: snapshot, then 3 deltas
    assert [k for _, k, _ in full_ckpt.files()] == ["full", "full"]  # keep=2 prunes older snapshots
    from_delta = DeltaCheckpointer(tmp_path / "delta").restore()
    from_full = DeltaCheckpointer(tmp_path / "full").restore()
    assert from_delta == from_full == expected and expected["step"] == 8
    with Loader(plan, rank=0, backend="inline") as resumed:
        resumed.load_state_dict(from_delta)
        tail = take(resumed, 6)
    assert all(same(a, b) for a, b in zip(tail, reference[8:]))
    # Delta files are smaller than the snapshot they are relative to.
    sizes = {kind: path.stat().st_size for _, kind, path in delta_ckpt.files()}
    assert sizes["delta"] < sizes["full"]


def test_snapshot_every_m_deltas_and_chain_continues_after_restore(tmp_path):
    ckpt = DeltaCheckpointer(tmp_path, every=1, full_every=2, keep=1)
    state = {"step": 0, "sources": {"web/en": {"position": 0}}}
    for step in range(1, 5):
        state = {"step": step, "sources": {"web/en": {"position": 10 * step}}}
        ckpt.save(state)
    assert [(s, k) for s, k, _ in ckpt.files()] == [(4, "full")]  # 1 full, 2-3 deltas, 4 full; keep=1 pruned
    again = DeltaCheckpointer(tmp_path, every=1, full_every=2, keep=1)
    assert again.restore() == state
    again.save({"step": 5, "sources": {"web/en": {"position": 55}}})
    doc = json.loads((tmp_path / "delta-0000000005.json").read_text())
    assert doc == {"format": 1, "step": 5, "base": 4, "add": {"step": 1, "sources": {"web/en": {"position": 15}}}}
    assert DeltaCheckpointer(tmp_path).restore() == {"step": 5, "sources": {"web/en": {"position": 55}}}


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = DeltaCheckpointer(tmp_path, full_every=4)
    ckpt.save({"step": 1, "x": 1})

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr("thruput.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save({"step": 2, "x": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full-0000000001.json"]  # no temporary left over
    assert DeltaCheckpointer(tmp_path).restore() == {"step": 1, "x": 1}


def test_errors_name_the_problem(tmp_path):
    assert DeltaCheckpointer(tmp_path).restore() is None
    with pytest.raises(DataError, match="every >= 1"):
        DeltaCheckpointer(tmp_path, every=0)
    ckpt = DeltaCheckpointer(tmp_path, full_every=4)
    with pytest.raises(DataError, match="not plain JSON"):
        ckpt.save({"step": 1, "x": object()})
    with pytest.raises(DataError, match="keys must be strings"):
        make_delta({}, {"a": {1: 2}})
    ckpt.save({"step": 1, "x": 1})
    ckpt.save({"step": 2, "x": 5})
    (tmp_path / "full-0000000001.json").unlink()
    with pytest.raises(DataError, match=r"delta-0000000002.json' is a delta of .*full-0000000001.json', which is missing"):
        DeltaCheckpointer(tmp_path).restore()
    (tmp_path / "delta-0000000002.json").write_text('{"format": 9}')
    with pytest.raises(DataError, match="format 9"):
        DeltaCheckpointer(tmp_path).restore()
