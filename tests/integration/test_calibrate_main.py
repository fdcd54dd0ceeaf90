"""Pulse runs of configs/traces.py, configs/calibrate.py and configs/infer.py through
`python -m deepintuit_jax.main`, and the calibrator's exact resume after SIGKILL. The trace
stage starts from the built-in tiny model itself (its pulse), so nothing here needs SFT."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--config.data.max_frames=4", "--config.data.max_pixels=12544",
         "--config.data.synthetic_train=12", "--config.data.synthetic_test=2"]


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _cmd(config, workdir, *extra):
  return [sys.executable, "-m", "deepintuit_jax.main", f"--config={config}",
          f"--workdir={workdir}", *SMALL, *extra]


def _run(env, config, workdir, *extra):
  p = subprocess.run(_cmd(config, workdir, *extra), cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=900)
  if p.returncode:
    raise AssertionError(f"{config} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                         f"{p.stderr[-5000:]}")
  return p


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def trace_dir(env, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("traces") / "run")
  p = _run(env, "configs/traces.py:pulse", wd, "--config.traces.max_items=6",
           "--config.traces.batch_size=4")
  return wd, p


def test_traces_pulse(trace_dir):
  wd, p = trace_dir
  rows = [json.loads(line) for line in open(os.path.join(wd, "traces.jsonl"))]
  assert sorted((r["item_id"], r["trace_index"]) for r in rows) == sorted(
      {(r["item_id"], k) for r in rows for k in (0, 1)})
  assert len(rows) == 12 and all(r["sampling"]["temperature"] == 0.7 for r in rows)  # tiny recipe
  examples = json.load(open(os.path.join(wd, "calibration_train.json")))
  assert len(examples) == 12 and all(os.path.isabs(
      e["conversations"][0]["content"][0]["video"]) for e in examples)
  assert list(json.load(open(os.path.join(wd, "classes.json"))))[0] == "moving_left"
  assert "item/s" in p.stderr


CAL = ["--config.train.batch_size=2", "--config.train.num_steps=4",
       "--config.checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def calibrator(env, trace_dir, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("cal") / "run")
  _run(env, "configs/calibrate.py:pulse", wd, f"--config.traces={trace_dir[0]}", *CAL)
  return wd


def test_calibrate_pulse_and_exact_resume_after_sigkill(env, trace_dir, calibrator, tmp_path):
  reference = _losses(calibrator)
  assert sorted(reference) == [1, 2, 3, 4] and all(np.isfinite(list(reference.values())))
  meta = json.load(open(os.path.join(calibrator, "hf", "calibrator.json")))
  assert meta["head"] == "label_token" and meta["prompt"] == "compact"
  wd = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd("configs/calibrate.py:pulse", wd,
                               f"--config.traces={trace_dir[0]}", *CAL),
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt2 = os.path.join(wd, "checkpoints", "2")
  deadline = time.time() + 600
  while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not os.path.isdir(os.path.join(wd, "checkpoints", "4"))
  p = _run(env, "configs/calibrate.py:pulse", wd, f"--config.traces={trace_dir[0]}", *CAL)
  assert "resumed from" in p.stdout
  resumed = _losses(wd)
  for step in (3, 4):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_infer_pulse(env, calibrator, tmp_path):
  wd = str(tmp_path / "infer")
  _run(env, "configs/infer.py:pulse", wd, f"--config.infer.calibrators=label_token={calibrator}",
       "--config.infer.max_items=2")
  rep = json.load(open(os.path.join(wd, "eval_report.json")))
  name = "SFT + GRPO + calibration (label_token)"
  assert set(rep["models"]) == {"SFT + GRPO", name}
  for split in ("test_close", "test_open"):
    assert rep["models"][name][split]["n"] == 2 and "ece" in rep["models"][name][split]
  rows = [json.loads(line) for line in open(os.path.join(
      wd, "predictions_SFT___GRPO___calibration__label_token__test_open.jsonl"))]
  for r in rows:
    assert abs(sum(r["scores"].values()) - 1) < 1e-5
    assert r["prediction"] == max(r["scores"], key=r["scores"].get)
  assert os.listdir(os.path.join(wd, "plots"))
