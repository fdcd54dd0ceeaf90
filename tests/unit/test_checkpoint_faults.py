"""Storage faults of checkpoints: an unreadable latest step is skipped (said, moved aside,
the newest intact one restored exactly, later saves unaffected); none intact stops with one
line and moves nothing; a failing write stops with one line naming the path and the error,
and the previous checkpoint stays and restores."""
from __future__ import annotations

import errno
import glob
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath

from deepintuit_jax.core.errors import CheckpointError, UserError
from deepintuit_jax.engine import checkpointing

from tests.unit.test_checkpointing import _leaves, _state


def _truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "*", "ocdbt.process_0", "d", "*"))
  assert files
  for p in files:
    os.truncate(p, os.path.getsize(p) // 2)


# How a disk that filled, or a half-copied bucket, leaves a step that Orbax lists as complete.
BREAK = {
    "arrays_truncated": _truncate_arrays,
    "metadata_empty": lambda d: os.truncate(os.path.join(d, "params", "_METADATA"), 0),
    "item_missing": lambda d: shutil.rmtree(os.path.join(d, "data")),
}


@pytest.fixture(scope="module")
def tiny():
  _, state, _, _ = _state()
  return state


def _saved(tiny, directory, steps, keep=3):
  ck = checkpointing.Checkpointer(directory, every_steps=1, keep=keep)
  for s in steps:
    ck.save(tiny.replace(step=tiny.step * 0 + s), {"pos": s}, force=True)
    ck.wait()
  return ck


@pytest.mark.parametrize("how", sorted(BREAK))
def test_unreadable_latest_step_is_skipped_said_and_moved_aside(tiny, tmp_path, capsys, how):
  d = str(tmp_path / "ck")
  _saved(tiny, d, (4, 8)).close()
  BREAK[how](os.path.join(d, "8"))
  ck = checkpointing.Checkpointer(d, every_steps=1, keep=2)
  assert ck.latest_step() == 8  # Orbax lists it: it was renamed into place, then broken
  restored, data = ck.restore(tiny)
  assert int(restored.step) == 4 and data == {"pos": 4}
  for a, b in zip(_leaves(tiny.replace(step=tiny.step * 0 + 4)), _leaves(restored)):
    np.testing.assert_array_equal(a, b)
  (line,) = [x for x in capsys.readouterr().out.splitlines() if "unreadable" in x]
  assert line.startswith(f"checkpoint step 8 in {d} is unreadable (")
  assert line.endswith(f"skipped it (moved to {d}/8.unreadable) and resumed from step 4")
  assert sorted(os.listdir(d)) == ["4", "8.unreadable"]  # kept for inspection
  assert ck.all_steps() == [4]
  # Training on saves step 8 again (not taken for the broken one), and keep=2 counts only
  # real steps: the moved-aside copy is never deleted nor restored.
  for s in (8, 12):
    assert ck.save(restored.replace(step=restored.step * 0 + s), {"pos": s}, force=True)
    ck.wait()
  assert ck.all_steps() == [8, 12] and os.path.isdir(os.path.join(d, "8.unreadable"))
  assert ck.restore(tiny)[1] == {"pos": 12}
  ck.close()


def test_no_intact_checkpoint_stops_with_one_line_and_moves_nothing(tiny, tmp_path):
  d = str(tmp_path / "ck")
  _saved(tiny, d, (4, 8)).close()
  _truncate_arrays(os.path.join(d, "8"))
  os.truncate(os.path.join(d, "4", "params", "_METADATA"), 0)
  ck = checkpointing.Checkpointer(d, every_steps=1)
  with pytest.raises(CheckpointError) as e:
    ck.restore(tiny)
  msg = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in msg and len(msg) < 800
  assert f"no checkpoint in {d} can be restored: step 8: " in msg and "; step 4: " in msg
  assert sorted(os.listdir(d)) == ["4", "8"]
  ck.close()


def test_a_failing_write_stops_with_one_line_and_keeps_the_previous(tiny, tmp_path,
                                                                      monkeypatch):
  """Every file Orbax writes through epath under step 6 fails as a full disk would."""
  d = str(tmp_path / "ck")
  ck = _saved(tiny, d, (2, 4), keep=2)
  cls = type(epath.Path(d))
  real = cls.write_text

  def full(self, *args, **kwargs):
    if f"{os.sep}6." in os.fspath(self):
      raise OSError(errno.ENOSPC, "No space left on device", os.fspath(self))
    return real(self, *args, **kwargs)
  monkeypatch.setattr(cls, "write_text", full)
  with pytest.raises(CheckpointError) as e:
    ck.save(tiny.replace(step=tiny.step * 0 + 6), {"pos": 6}, force=True)
    ck.wait()  # the save runs in the background: its failure surfaces here
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"saving checkpoint step 6 in {d} failed (")
  assert "No space left on device" in msg and f"{d}/6.orbax-checkpoint-tmp" in msg
  assert "latest complete checkpoint is step 4" in msg
  monkeypatch.undo()
  ck.close()
  # The rerun: steps 2 and 4 are intact (keep=2 deleted nothing), step 4 restores, and
  # step 6 saves over the failed attempt's temporary directory.
  ck = checkpointing.Checkpointer(d, every_steps=1, keep=2)
  assert ck.all_steps() == [2, 4]
  restored, data = ck.restore(tiny)
  assert int(restored.step) == 4 and data == {"pos": 4}
  assert ck.save(restored.replace(step=restored.step * 0 + 6), {"pos": 6}, force=True)
  ck.wait()
  assert ck.all_steps() == [4, 6] and sorted(os.listdir(d)) == ["4", "6"]
  ck.close()


def test_init_from_an_unreadable_checkpoint_is_one_line(tiny, tmp_path):
  d = str(tmp_path / "other")
  _saved(tiny, os.path.join(d, "checkpoints"), (3,)).close()
  _truncate_arrays(os.path.join(d, "checkpoints", "3"))
  with pytest.raises(CheckpointError, match=r"init_from .*other': cannot load the parameters "
                                            r"of its checkpoint step 3 into this model \("):
    checkpointing.load_params(d, jax.tree.map(lambda x: x, tiny))
