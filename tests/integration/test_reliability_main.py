"""Two runs in one workdir, then a broken latest checkpoint (pulse SFT runs of `main` in
subprocesses, issue 18's bars): the second run is refused at once naming the holder while
the first finishes; a rerun whose latest checkpoint's array files are truncated resumes from
the previous one, says so, and finishes."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config=configs/sft.py:pulse", "--config.train.batch_size=2",
        "--config.data.max_frames=4", "--config.data.max_pixels=12544",
        "--config.data.synthetic_train=12", "--config.data.synthetic_test=2",
        "--config.data.eval_files=none", "--config.checkpoint.export=False",
        "--config.train.num_steps=12", "--config.checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _cmd(workdir):
  return [sys.executable, "-m", "deepintuit_jax.main", f"--workdir={workdir}", *ARGS]


def _train_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def test_second_run_refused_then_broken_latest_checkpoint_skipped(env, tmp_path):
  w = str(tmp_path / "run")
  first = subprocess.Popen(_cmd(w), cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  while (not os.path.isfile(os.path.join(w, "lease.json")) and first.poll() is None
         and time.time() < deadline):
    time.sleep(0.1)
  assert first.poll() is None, "the first run ended before the second could start"
  # 1. The second run in the same workdir: refused in seconds, one line naming the holder.
  t0 = time.perf_counter()
  second = subprocess.run(_cmd(w), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
  refused_s = time.perf_counter() - t0
  print(f"second run refused in {refused_s:.1f} s: {second.stderr.strip()}")
  assert second.returncode == 2 and refused_s < 20, (second.returncode, second.stderr[-2000:])
  assert "Traceback" not in second.stderr and second.stdout == ""
  line = second.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: workdir {w} is in use by another run (host ")
  assert f"pid {first.pid}, since " in line
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]  # the first run finished undisturbed
  assert _train_steps(w) == list(range(1, 13)) and not os.path.exists(
      os.path.join(w, "lease.json"))
  # 2. As a run killed after its step-12 checkpoint whose array files were then cut short
  # (a full disk, a half-copied bucket) leaves it: no finished.json, step 12 unreadable.
  os.remove(os.path.join(w, "finished.json"))
  for p in glob.glob(os.path.join(w, "checkpoints", "12", "*", "ocdbt.process_0", "d", "*")):
    os.truncate(p, os.path.getsize(p) // 2)
  p = subprocess.run(_cmd(w), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  ckpts = os.path.join(w, "checkpoints")
  (said,) = [x for x in p.stdout.splitlines() if "unreadable" in x]
  print(said)
  assert said.startswith(f"checkpoint step 12 in {ckpts} is unreadable (")
  assert said.endswith(f"skipped it (moved to {ckpts}/12.unreadable) and resumed from step 8")
  assert f"resumed from {ckpts} step 8" in p.stdout
  assert _train_steps(w) == list(range(1, 13))  # 9-12 trained again, one row each
  assert sorted(os.listdir(ckpts)) == ["12", "12.unreadable", "8", "model_source.json"]
  assert json.load(open(os.path.join(w, "finished.json")))["step"] == 12
