"""One run per workdir (deepintuit_jax.core.lease): a live holder refuses a second run naming it,
a dead one (its pid gone, or its heartbeat expired) is taken over with a note, the heartbeat
renews, release leaves nothing, other processes do nothing, and the bucket (best-effort)
path behaves the same."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from deepintuit_jax.core import lease as lease_lib, paths
from deepintuit_jax.core.errors import UserError, WorkdirBusy


def _write_holder(workdir, **fields):
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2025-01-02 03:04:05",
            "heartbeat": time.time(), "token": "other"}
  holder.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lease_lib.LEASE), "w") as f:
    json.dump(holder, f)
  return holder


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_second_holder_is_refused_naming_the_first_and_touches_nothing(tmp_path):
  w = str(tmp_path / "run")
  with lease_lib.Lease(w) as first:
    assert first.created_workdir and os.listdir(w) == [lease_lib.LEASE]
    held = open(os.path.join(w, lease_lib.LEASE)).read()
    t0 = time.perf_counter()
    with pytest.raises(WorkdirBusy) as e:
      lease_lib.Lease(w).acquire()
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in msg and w in msg
    assert "--workdir" in msg
    assert os.listdir(w) == [lease_lib.LEASE]  # the refused run created nothing
    assert open(os.path.join(w, lease_lib.LEASE)).read() == held
  assert not os.path.exists(w)  # released; the workdir it created was empty: removed


def test_release_keeps_a_workdir_that_holds_files(tmp_path):
  w = tmp_path / "run"
  with lease_lib.Lease(str(w)):
    (w / "metrics.jsonl").write_text("{}\n")
  assert os.listdir(w) == ["metrics.jsonl"]
  with lease_lib.Lease(str(w)) as again:  # a rerun after a clean end: no note
    assert again.note == "" and not again.created_workdir


def test_a_dead_pid_on_this_host_is_taken_over_with_a_note(tmp_path):
  w = str(tmp_path / "run")
  _write_holder(w, pid=_dead_pid())
  with lease_lib.Lease(w) as taken:
    assert "took over the lease of a run that is gone" in taken.note
    assert "is not running on this host" in taken.note
    holder = json.load(open(os.path.join(w, lease_lib.LEASE)))
    assert holder["token"] == taken.token and holder["pid"] == os.getpid()
  assert not os.path.exists(os.path.join(w, lease_lib.LEASE))
  assert sorted(os.listdir(w)) == []  # no `.stale-` copy left behind


def test_an_expired_heartbeat_from_another_host_is_taken_over(tmp_path):
  w = str(tmp_path / "run")
  _write_holder(w, host="elsewhere", pid=1, heartbeat=time.time() - 400)
  with lease_lib.Lease(w, timeout=300) as taken:
    assert "no heartbeat for 400 s" in taken.note
  _write_holder(w, host="elsewhere", pid=1, heartbeat=time.time() - 20)  # alive elsewhere
  with pytest.raises(WorkdirBusy, match="host elsewhere, pid 1, since 2025-01-02 03:04:05, "
                                        "heartbeat 20 s ago"):
    lease_lib.Lease(w, timeout=300).acquire()


def test_same_pid_under_another_token_is_a_restarted_container(tmp_path):
  w = str(tmp_path / "run")
  _write_holder(w)  # this pid, this host, but not this Lease's token
  with lease_lib.Lease(w) as taken:
    assert "is this process" in taken.note


def test_an_unreadable_lease_is_replaced_with_a_note(tmp_path):
  w = tmp_path / "run"
  w.mkdir()
  (w / lease_lib.LEASE).write_text("")
  with lease_lib.Lease(str(w)) as taken:
    assert "replaced an unreadable" in taken.note


def _until(condition, seconds=10.0):
  """Polls `condition` (the heartbeat thread runs on its own time on a loaded machine)."""
  deadline = time.time() + seconds
  while not (ok := condition()) and time.time() < deadline:
    time.sleep(0.02)
  return ok


def test_heartbeat_renews_and_stops_when_the_lease_is_lost(tmp_path, capsys):
  w = str(tmp_path / "run")
  path = os.path.join(w, lease_lib.LEASE)
  with lease_lib.Lease(w, interval=0.05):
    first = json.load(open(path))["heartbeat"]
    assert _until(lambda: json.load(open(path))["heartbeat"] > first)
    _write_holder(w, token="thief")  # taken over behind this run's back
    assert _until(lambda: "is no longer this run's" in capsys.readouterr().out)
    assert json.load(open(path))["token"] == "thief"  # not overwritten by a later beat
  assert json.load(open(path))["token"] == "thief"  # not removed


def test_other_processes_do_nothing(tmp_path):
  w = str(tmp_path / "run")
  with lease_lib.Lease(w, enabled=False):
    assert not os.path.exists(w)
  _write_holder(w)
  with lease_lib.Lease(w, enabled=False):  # never refused: process 0 holds it for the run
    pass


def test_bucket_path_write_then_read_back(tmp_path, monkeypatch):
  """The gs:// branch, run on a local directory (epath serves both): no link, the lease is
  kept only when the read-back still shows this run's token."""
  monkeypatch.setattr(paths, "is_remote", lambda p: True)
  w = str(tmp_path / "run")
  with lease_lib.Lease(w, settle=0.0) as held:
    assert json.load(open(os.path.join(w, lease_lib.LEASE)))["token"] == held.token
    with pytest.raises(WorkdirBusy, match="in use by another run"):
      lease_lib.Lease(w, settle=0.0).acquire()
  _write_holder(w, host="elsewhere", heartbeat=time.time() - 1000)
  with lease_lib.Lease(w, settle=0.0) as taken:
    assert "no heartbeat" in taken.note
  # A race lost: another run's upload lands between this run's write and its read-back.
  real_write = paths.write_text

  def racing_write(path, text):
    real_write(path, text)
    if path.endswith(lease_lib.LEASE) and "winner" not in text:
      _write_holder(w, host="elsewhere", token="winner")
  monkeypatch.setattr(paths, "write_text", racing_write)
  with pytest.raises(WorkdirBusy, match="host elsewhere"):
    lease_lib.Lease(w, settle=0.0).acquire()


def test_without_hard_links_o_excl_still_refuses_a_second_run(tmp_path, monkeypatch):
  def no_link(src, dst):
    raise PermissionError(1, "Operation not permitted")
  monkeypatch.setattr(os, "link", no_link)
  w = str(tmp_path / "run")
  with lease_lib.Lease(w) as held:
    assert json.load(open(os.path.join(w, lease_lib.LEASE)))["token"] == held.token
    with pytest.raises(WorkdirBusy):
      lease_lib.Lease(w).acquire()
    assert os.listdir(w) == [lease_lib.LEASE]
  _write_holder(w, pid="not a pid")  # a malformed holder is unreadable: replaced
  with lease_lib.Lease(w) as taken:
    assert "the lease file is unreadable" in taken.note
