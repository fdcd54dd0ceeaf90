"""The whole chain (`configs/deepintuit.py:pulse`, a few steps per stage) killed while in
its calibration step and rerun: finished steps are not rerun, the interrupted one resumes
from its checkpoint, and the results table comes out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config.data.max_frames=4", "--config.data.max_pixels=12544",
        "--config.data.synthetic_train=8", "--config.data.synthetic_test=2",
        "--config.calibrate.train.batch_size=2", "--config.calibrate_hidden.train.batch_size=2",
        "--config.traces.traces.batch_size=4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, xla_cache):
  return main_env(tmp_path_factory.mktemp("chain"), xla_cache)


def _cmd(workdir):
  return [sys.executable, "-m", "deepintuit_jax.main", "--config=configs/deepintuit.py:pulse",
          f"--workdir={workdir}", *ARGS]


def test_chain_killed_then_rerun(env, tmp_path):
  wd = str(tmp_path / "chain")
  log = open(tmp_path / "first.log", "w")
  proc = subprocess.Popen(_cmd(wd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  ckpt = os.path.join(wd, "calibrate", "checkpoints", "2")
  deadline = time.time() + 1200
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.close()
  first = open(tmp_path / "first.log").read()
  assert proc.returncode == -signal.SIGKILL, f"the chain ended before the kill:\n{first[-4000:]}"
  before = [s for s in ("sft", "grpo", "traces")
            if os.path.isfile(os.path.join(wd, s, "stage_done.json"))]
  assert before == ["sft", "grpo", "traces"]  # grpo is registered: the chain runs it
  assert not os.path.exists(os.path.join(wd, "calibrate", "stage_done.json"))
  stamps = {s: os.path.getmtime(os.path.join(wd, s, "stage_done.json")) for s in before}
  p = subprocess.run(_cmd(wd), cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
  for s in before:
    assert f"step {s}: finished before, skipped" in p.stdout
    assert os.path.getmtime(os.path.join(wd, s, "stage_done.json")) == stamps[s]
  assert f"resumed from {os.path.join(wd, 'calibrate', 'checkpoints')} step 2" in p.stdout
  res = json.load(open(os.path.join(wd, "results.json")))
  names = [r["model"] for r in res["rows"]]
  policy = "SFT + GRPO" if "grpo" in before else "SFT"
  assert names[-2:] == [f"{policy} + calibration (label token)",
                        f"{policy} + calibration (hidden-state head)"]
  assert policy in names
  for r in res["rows"]:
    assert r["close_n"] == 2 and r["open_n"] == 2 and 0 <= r["close_accuracy"] <= 1
  assert res["rows"][-1]["close_ece"] is not None
  assert "| model | close acc |" in open(os.path.join(wd, "results.md")).read()
  assert "| model | close acc |" in p.stdout
