"""Resuming from a checkpoint that is hostile, damaged or incomplete: a clear CheckpointError naming
the file (and the previous checkpoint that still reads), never code execution, never a silent
partial load; saves fsync their files and folder before the rename that publishes them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evolm import checkpoint as ck
from evolm.checkpoint import CheckpointError, load_trainer_state
from evolm.train.loop import run
from test_loop import CFG, PHASES, ToyTask, _model

quiet = {"log": lambda m: None}


@pytest.fixture()
def stopped(tmp_path) -> Path:
    """A run stopped after 4 steps: checkpoints kept at steps 3 (the phase end) and 4."""
    run(_model(), ToyTask(), PHASES, CFG, tmp_path / "r", stop_after_steps=4, **quiet)
    steps = sorted((tmp_path / "r" / "checkpoints").iterdir())
    assert [p.name for p in steps] == ["step_0000003", "step_0000004"]
    return tmp_path / "r"


def _resume(out: Path):
    return run(_model(1), ToyTask(), PHASES, CFG, out, resume=True, **quiet)


def test_trainer_state_is_plain_data_read_without_pickle(stopped):
    state = torch.load(stopped / "checkpoints" / "step_0000004" / "trainer.pt", weights_only=True)
    assert state["global_step"] == 4 and isinstance(state["rng"]["numpy"][1], list)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))  # runs at unpickling time under a full torch.load


def test_a_trainer_state_that_would_run_code_is_refused(stopped, tmp_path):
    marker = tmp_path / "pwned"
    state = load_trainer_state(str(stopped / "checkpoints" / "step_0000004"))
    state["task"] = {"i": _Payload(str(marker))}
    torch.save(state, stopped / "checkpoints" / "step_0000004" / "trainer.pt")
    with pytest.raises(CheckpointError, match=r"step_0000004/trainer.pt: holds Python objects") as e:
        _resume(stopped)
    assert not marker.exists()
    assert "step_0000003 reads cleanly" in str(e.value)


@pytest.mark.parametrize("name", ["trainer.pt", "model.safetensors"])
def test_a_truncated_file_names_itself_and_the_previous_good_checkpoint(stopped, name):
    f = stopped / "checkpoints" / "step_0000004" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        _resume(stopped)
    msg = str(e.value)
    assert f"step_0000004/{name}" in msg and "step_0000003 reads cleanly" in msg, msg
    (stopped / "checkpoints" / "step_0000004").rename(stopped / "broken")  # what the message advises
    full = run(_model(), ToyTask(), PHASES, CFG, stopped.parent / "full", **quiet)
    assert _resume(stopped)["losses"] == full["losses"]


def test_no_readable_checkpoint_says_start_again(stopped):
    for step in ("step_0000003", "step_0000004"):
        (stopped / "checkpoints" / step / "trainer.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="no older checkpoint .* reads cleanly: start the run again"):
        _resume(stopped)


def test_weights_missing_a_tensor_or_of_the_wrong_shape_are_refused(stopped):
    f = stopped / "checkpoints" / "step_0000004" / "model.safetensors"
    good = load_file(str(f))
    bad = {k: v for k, v in good.items() if k != "layers.1.mlp.down_proj.weight"}
    bad["layers.9.extra"] = torch.zeros(1)
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match=r"does not fit this model: missing layers.1.mlp.down_proj.weight; "
                                              r"unexpected layers.9.extra"):
        _resume(stopped)
    bad = dict(good, **{"norm.weight": torch.ones(7)})
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match=r"wrong shape norm.weight \(7,\) \(model: \(32,\)\)"):
        _resume(stopped)


def test_a_trainer_state_that_is_not_ours_is_refused(stopped):
    torch.save({"step": 3}, stopped / "checkpoints" / "step_0000004" / "trainer.pt")
    with pytest.raises(CheckpointError, match="no phase_idx, phase_step.*not written by an evolm trainer"):
        _resume(stopped)


def test_saves_fsync_files_and_folders_before_and_after_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append("rename " + os.path.basename(b))
        real_replace(a, b)

    monkeypatch.setattr(ck.os, "fsync", fsync)
    monkeypatch.setattr(ck.os, "replace", replace)
    ck.save_checkpoint(_model(), str(tmp_path / "m"), trainer_state={"x": torch.ones(2)})
    rename = events.index("rename m")
    synced = {e.split(" ", 1)[1] for e in events[:rename]}
    assert {"model.safetensors", "config.json", "trainer.pt"} <= synced
    assert any(e.startswith("fsync .tmp-m-") for e in events[:rename])  # the folder's entries
    assert events[rename + 1:] == [f"fsync {tmp_path.name}"]  # the rename itself


def test_plain_pickle_is_refused_even_for_a_harmless_object(tmp_path):
    (tmp_path / "trainer.pt").write_bytes(pickle.dumps({"a": {1, 2}}))
    with pytest.raises(CheckpointError, match="trainer.pt: "):
        load_trainer_state(str(tmp_path))
