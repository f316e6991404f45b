"""Checkpoints that do not load: described for what they are, skipped on resume, never deleted."""
from __future__ import annotations

import collections
import os
import warnings

import pytest
import torch

from thruput.checkpoint import (CheckpointError, CheckpointWarning, list_checkpoints, load_checkpoint, load_newest,
                                restore, save_checkpoint)


def _good(tmp_path, step: int) -> bytes:
    save_checkpoint({"step": step, "w": torch.arange(4.0) * step}, tmp_path, step, keep=0)
    return (tmp_path / f"step_{step:08d}.pt").read_bytes()


class Opaque:  # a class a weights_only load refuses
    pass


def _bad_files(tmp_path) -> dict[str, bytes]:
    good = _good(tmp_path / "src", 1)
    torch.save({"step": 2, "odd": Opaque()}, tmp_path / "globals.pt")
    return {"empty": b"", "truncated": good[: len(good) // 2], "random": os.urandom(3000),
            "globals": (tmp_path / "globals.pt").read_bytes()}


def test_each_kind_of_unloadable_file_is_described_without_torchs_weights_only_advice(tmp_path) -> None:
    expected = {
        "empty": "empty file (0 bytes)",
        "truncated": "truncated: a zip archive (torch.save's format) of {size:,} bytes whose end is missing",
        "random": "corrupt or not a checkpoint: 3,000 bytes that are not a zip archive (torch.save's format)",
        "globals": "holds Python objects that a weights_only load refuses (test_checkpoint.Opaque); thruput "
                   "writes tensors and plain data only, so this file comes from elsewhere",
    }
    for kind, data in _bad_files(tmp_path).items():
        path = tmp_path / f"{kind}.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == f"{path}: " + expected[kind].format(size=len(data)), kind
        assert "weights_only` set to `False`" not in str(info.value) and "\n" not in str(info.value)


def test_rotation_keeps_the_checkpoint_resumed_from_while_a_bad_newer_one_is_present(tmp_path) -> None:
    _good(tmp_path, 5)
    _good(tmp_path, 6)
    bad = tmp_path / "step_00000009.pt"
    bad.write_bytes(b"")
    with pytest.warns(CheckpointWarning, match=r"step_00000009.pt does not load \(empty file \(0 bytes\)\); "
                                               r"resuming from step_00000006.pt.*left in place"):
        path, state, skipped = load_newest(tmp_path)
    assert path.name == "step_00000006.pt" and state["step"] == 6 and skipped == [bad]
    save_checkpoint({"step": 7}, tmp_path, 7, keep=1)
    # Only the one before the new good checkpoint goes; the bad newer file is not deleted (and the
    # old rotation, counting it, deleted step 7 itself and kept only the bad file).
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000007.pt", "step_00000009.pt"]


def test_set_aside_keeps_the_bytes_under_another_name(tmp_path) -> None:
    _good(tmp_path, 1)
    (tmp_path / "step_00000002.pt").write_bytes(b"torn")
    (tmp_path / "step_00000002.pt.unloadable").write_bytes(b"older")  # not overwritten either
    with pytest.warns(CheckpointWarning, match="kept as step_00000002.pt.unloadable.1"):
        path, _, _ = load_newest(tmp_path, set_aside=True)
    assert path.name == "step_00000001.pt"
    assert (tmp_path / "step_00000002.pt.unloadable.1").read_bytes() == b"torn"
    assert (tmp_path / "step_00000002.pt.unloadable").read_bytes() == b"older"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]


def test_when_none_loads_the_error_lists_every_file_tried(tmp_path) -> None:
    (tmp_path / "step_00000001.pt").write_bytes(b"")
    (tmp_path / "step_00000002.pt").write_bytes(b"xyz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing loads: an error, not warnings
        with pytest.raises(CheckpointError) as info:
            load_newest(tmp_path)
    assert str(info.value) == (
        f"no checkpoint in {tmp_path} loads (step_00000002.pt: corrupt or not a checkpoint: 3 bytes that are not "
        f"a zip archive (torch.save's format); step_00000001.pt: empty file (0 bytes))")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_newest(tmp_path / "absent")


def test_restore_names_the_entry_or_key_that_does_not_fit(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "x.pt"
    with pytest.raises(CheckpointError, match=r"x.pt: no 'step' entry"):
        restore(path, {"model": model.state_dict()}, {"model": model}, entries=("step",))
    wide = torch.nn.Linear(4, 2).state_dict()
    with pytest.raises(CheckpointError, match=r"x.pt does not fit this run: model.weight has shape \(2, 4\) in the "
                                              r"checkpoint, \(2, 3\) in this run$"):
        restore(path, {"model": wide}, {"model": model})
    with pytest.raises(CheckpointError, match=r"model.bias is not in the checkpoint"):
        restore(path, {"model": collections.OrderedDict(weight=torch.zeros(2, 3))}, {"model": model})
    opt = torch.optim.AdamW(model.parameters())
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).state_dict()
    with pytest.raises(CheckpointError, match=r"x.pt does not fit this run: optimizer state: .*parameter group"):
        restore(path, {"optimizer": other}, {"optimizer": opt})
    with pytest.raises(CheckpointError, match="holds a list"):
        restore(path, [1, 2], {"model": model})
