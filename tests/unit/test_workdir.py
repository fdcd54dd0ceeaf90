"""Workdir protection: recorded config and its comparison, finished runs, metric rows
dropped at restart, cleanup of a failed start; and the deferred Ctrl-C of the train loop."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from deepintuit_jax.core import interrupts, workdir as wd
from deepintuit_jax.core.errors import WorkdirConflict

CONFIG = {"seed": 42, "stage": "sft", "mesh": {"shape": (-1, 1, 1)},
          "train": {"learning_rate": -1.0, "log_every": 1, "num_steps": 5},
          "data": {"num_workers": 0, "train_file": ""}}


def _with(**changes):
  c = json.loads(json.dumps(CONFIG))
  for key, value in changes.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _snapshot(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
  return out


def test_diff_names_dotted_keys_old_and_new():
  new = _with(train__learning_rate=0.01, data__num_workers=2)
  new["extra"] = 1
  assert wd.diff(CONFIG, new) == {"data.num_workers": (0, 2),
                                  "extra": ("<absent>", 1),
                                  "train.learning_rate": (-1.0, 0.01)}
  assert wd.diff(CONFIG, json.loads(json.dumps(CONFIG))) == {}  # tuple vs list: same


def test_refuses_changed_numbers_before_touching_any_file(tmp_path):
  d = str(tmp_path / "run")
  plan = wd.check(d, CONFIG)
  assert plan.fresh and not os.path.exists(d)  # check only reads
  os.makedirs(os.path.join(d, "checkpoints", "4"))
  wd.record(plan, CONFIG, ["main"], resolved="SFTRun(...)")
  assert json.load(open(os.path.join(d, "run_config.json")))["mesh"]["shape"] == [-1, 1, 1]
  before = _snapshot(d)
  with pytest.raises(WorkdirConflict) as e:
    wd.check(d, _with(train__learning_rate=0.01, train__log_every=5))
  msg = str(e.value)
  assert "train.learning_rate: -1.0 -> 0.01" in msg and "log_every" not in msg
  assert "--workdir" in msg and "--allow_config_change" in msg and "step 4" in msg
  assert _snapshot(d) == before


def test_allowed_and_overridden_changes_are_logged(tmp_path):
  d = str(tmp_path)
  wd.record(wd.check(d, CONFIG), CONFIG)
  recorded = open(os.path.join(d, "run_config.json")).read()
  plan = wd.check(d, _with(train__log_every=5, data__num_workers=2))  # allow-listed
  assert plan.overridden == () and set(plan.changes) == {"train.log_every", "data.num_workers"}
  wd.record(plan, _with(train__log_every=5, data__num_workers=2), ["a"])
  wd.commit(plan, _with(train__log_every=5))  # nothing overridden: the record stays
  assert open(os.path.join(d, "run_config.json")).read() == recorded
  new = _with(train__num_steps=9)
  plan = wd.check(d, new, allow_change=True)
  assert plan.overridden == ("train.num_steps",)
  wd.record(plan, new, ["b"])
  assert open(os.path.join(d, "run_config.json")).read() == recorded  # not before it ends
  wd.commit(plan, new)
  assert json.load(open(os.path.join(d, "run_config.json")))["train"]["num_steps"] == 9
  log = [json.loads(line) for line in open(os.path.join(d, "config_history.jsonl"))]
  assert [e["argv"] for e in log] == [["a"], ["b"]]
  assert log[1]["changes"] == {"train.num_steps": [5, 9]}
  assert log[1]["allowed_by"] == {"train.num_steps": "--allow_config_change"}
  assert log[0]["allowed_by"]["train.log_every"] == "ALLOWED_CHANGES"


def test_finished_only_when_its_step_is_the_latest_checkpoint(tmp_path):
  d = str(tmp_path)
  wd.record(wd.check(d, CONFIG), CONFIG)
  os.makedirs(os.path.join(d, "checkpoints", "3"))
  os.makedirs(os.path.join(d, "checkpoints", "2.orbax-checkpoint-tmp-1"))  # unfinished
  assert wd.check(d, CONFIG).finished_step is None
  wd.mark_finished(d, 3)
  assert wd.check(d, CONFIG).finished_step == 3
  assert wd.check(d, _with(train__log_every=2)).finished_step == 3
  assert wd.check(d, _with(train__num_steps=8), allow_change=True).finished_step is None
  os.makedirs(os.path.join(d, "checkpoints", "5"))  # trained on after it was marked
  assert wd.check(d, CONFIG).finished_step is None


def _write_rows(path, rows, tail=""):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write(tail)


def test_truncate_metrics_drops_rows_rewritten_at_restart(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
          {"step": 2, "split": "val", "accuracy": 0.5}, {"step": 3, "loss": 1.0}]
  _write_rows(path, rows, tail='{"step": 4, "lo')  # a line cut by SIGKILL
  assert wd.truncate_metrics(path, 2) == 2
  assert [json.loads(x) for x in open(path)] == rows[:3]
  inode = os.stat(path).st_ino
  assert wd.truncate_metrics(path, 2) == 0 and os.stat(path).st_ino == inode  # once
  # Resuming at the final step: its eval / data rows are written again, its train row is not.
  _write_rows(path, rows[:2] + [{"step": 2, "split": "a"}, {"step": 2, "skipped/total": 0}])
  assert wd.truncate_metrics(path, 2, redo_final=True) == 2
  assert [json.loads(x) for x in open(path)] == rows[:2]
  assert wd.truncate_metrics(str(tmp_path / "absent.jsonl"), 0) == 0


def test_guard_removes_only_what_a_failed_start_created(tmp_path):
  fresh = str(tmp_path / "fresh")
  with pytest.raises(RuntimeError):
    with wd.Guard(fresh):
      open(os.path.join(fresh, "run_config.json"), "w").close()
      raise RuntimeError("bad input")
  assert not os.path.exists(fresh)
  old = tmp_path / "old"
  (old / "notes").mkdir(parents=True)
  (old / "mine.txt").write_text("keep")
  with pytest.raises(RuntimeError):
    with wd.Guard(str(old)):
      (old / "tb").mkdir()
      (old / "metrics.jsonl").write_text("{}\n")
      raise RuntimeError
  assert sorted(os.listdir(old)) == ["mine.txt", "notes"]
  with pytest.raises(RuntimeError):  # once a checkpoint exists nothing is removed
    with wd.Guard(str(old)):
      (old / "checkpoints" / "2").mkdir(parents=True)
      raise RuntimeError
  assert sorted(os.listdir(old)) == ["checkpoints", "mine.txt", "notes"]
  with wd.Guard(str(tmp_path / "ok")):
    pass
  assert os.path.isdir(tmp_path / "ok")


class _Ckpt:
  """Records saves like Checkpointer: (step, data_state)."""
  every_steps = 100

  def __init__(self):
    self.saved = []

  def save(self, state, data_state, *, force=False):
    if (force or int(state.step) % self.every_steps == 0) and int(state.step) not in [s for s, _ in self.saved]:
      self.saved.append((int(state.step), data_state))

  def wait(self):
    pass

  def latest_step(self):
    return max([s for s, _ in self.saved], default=None)


class _State:
  def __init__(self, step):
    self.step = np.int32(step)


def test_ctrl_c_in_train_loop_checkpoints_the_last_step(tmp_path):
  from deepintuit_jax.engine import loop

  def step_fn(state, micro):
    if int(state.step) == 2:  # Ctrl-C while step 3 runs
      os.kill(os.getpid(), signal.SIGINT)
    return _State(int(state.step) + 1), {"ok": True, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0,
                                          "tokens": 4}

  batches = iter([((None,), 4, {"pos": i + 1}) for i in range(10)])
  ck = _Ckpt()
  writer = loop.MetricsWriter(str(tmp_path), tensorboard=False)
  previous = signal.getsignal(signal.SIGINT)
  with pytest.raises(interrupts.Interrupted) as e:
    loop.train_loop(_State(0), step_fn, batches, total_steps=10, writer=writer, checkpointer=ck)
  assert e.value.step == 3 and e.value.saved and "resumes from step 3" in str(e.value)
  assert ck.saved == [(3, {"pos": 3})]  # step 3 done, its data position
  assert [json.loads(x)["step"] for x in open(writer.path)] == [1, 2, 3]
  assert signal.getsignal(signal.SIGINT) is previous  # handler restored


def test_second_ctrl_c_exits_at_once(monkeypatch):
  codes = []
  monkeypatch.setattr(os, "_exit", codes.append)
  stop = interrupts.StopRequest().install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and codes == []
    os.kill(os.getpid(), signal.SIGINT)
    assert codes == [130]
  finally:
    stop.uninstall()
  assert interrupts.StopRequest().install(processes=2)._installed is False
