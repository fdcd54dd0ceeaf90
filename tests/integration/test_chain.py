"""The whole chain (`configs/deepintuit.py:pulse`, a few steps per stage): one uninterrupted
run as the reference, on a `gs://` workdir (the offline fake bucket of tests/fake_bucket.py:
every step's files must go through epath, none may land in the working directory), and a
run on a local workdir SIGKILLed in its trace step, in its calibration step, between
two steps and in its inference step, rerun after each kill, which must end with the same
results.json, eval report, predictions, traces and metrics (issue 18 item 4).

The kills are deterministic: the run kills itself through the test hook
`interrupts.kill_point` ($DEEPINTUIT_TEST_KILL_AFTER). The killed run starts from copies of
the reference's finished steps before traces (imitation, SFT, GRPO), which it skips as
finished, so that only the steps under test run again."""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from deepintuit_jax.core.interrupts import KILL_AFTER
from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config.data.max_frames=4", "--config.data.max_pixels=12544",
        "--config.data.synthetic_train=8", "--config.data.synthetic_test=2",
        "--config.calibrate.train.batch_size=2", "--config.calibrate_hidden.train.batch_size=2",
        "--config.traces.traces.batch_size=4"]
BEFORE_TRACES = ("imitation_scratch", "imitation", "sft", "grpo", "grpo_control")
LATER = ("traces", "calibrate", "calibrate_hidden")


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _run(env, workdir, kill_after: str | None = None, *, bucket: str | None = None,
         cwd: str = REPO) -> subprocess.CompletedProcess:
  """The pulse chain in `workdir`; `kill_after` arms the kill hook ("<n>:<label text>");
  `bucket`: the local root of the fake gs:// bucket the run sees."""
  e = dict(env, **({KILL_AFTER: kill_after} if kill_after else {}))
  entry = (["-m", "tests.fake_bucket", f"--root={bucket}", "--"] if bucket else
           ["-m", "deepintuit_jax.main"])
  cmd = [sys.executable, *entry, f"--config={os.path.join(REPO, 'configs', 'deepintuit.py')}"
         ":pulse", f"--workdir={workdir}", *ARGS]
  return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=1200)


def _killed(p, what: str) -> None:
  assert p.returncode == -signal.SIGKILL, (
      f"not killed {what} (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def _lines(path) -> list[dict]:
  """The rows of a JSONL file; every line complete (newline-terminated) and valid JSON."""
  with open(path, "rb") as f:
    data = f.read()
  assert data.endswith(b"\n") or not data, f"{path}: truncated last line"
  return [json.loads(line) for line in data.decode().splitlines()]


def _trace_keys(path) -> list[tuple[str, int]]:
  keys = [(r["item_id"], r["trace_index"]) for r in _lines(path)]
  assert len(keys) == len(set(keys)), f"{path}: duplicated traces"
  return keys


def _losses(path) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in _lines(path) if "loss" in r]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """The uninterrupted chain on gs://bucket/chain; returns (the bucket's local folder of it,
  the process)."""
  root, cwd = tmp_path_factory.mktemp("bucket"), tmp_path_factory.mktemp("cwd")
  p = _run(env, "gs://bucket/chain", bucket=str(root), cwd=str(cwd))
  assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
  assert os.listdir(cwd) == [], f"files written outside the bucket: {os.listdir(cwd)}"
  assert "results in gs://bucket/chain/results.md" in p.stdout
  return str(root / "bucket" / "chain"), p


def test_chain_pulse_results(reference):
  wd, p = reference
  res = json.load(open(os.path.join(wd, "results.json")))
  names = [r["model"] for r in res["rows"]]
  assert names[-3:] == ["SFT + GRPO", "SFT + GRPO + calibration (label token)",
                        "SFT + GRPO + calibration (hidden-state head)"]
  assert "SFT" in names
  for r in res["rows"]:
    assert r["close_n"] == 2 and r["open_n"] == 2 and 0 <= r["close_accuracy"] <= 1
  assert res["rows"][-1]["close_ece"] is not None
  assert "| model | close acc |" in open(os.path.join(wd, "results.md")).read()
  assert "| model | close acc |" in p.stdout


def test_chain_killed_in_each_late_step_then_rerun_matches_uninterrupted(env, reference,
                                                                        tmp_path):
  ref = reference[0]
  wd = str(tmp_path / "chain")
  for step in BEFORE_TRACES:
    shutil.copytree(os.path.join(ref, step), os.path.join(wd, step),
                    ignore=shutil.ignore_patterns("checkpoints", "tb"))
  done = lambda step: os.path.join(wd, step, "stage_done.json")
  stamps = {s: os.path.getmtime(done(s)) for s in BEFORE_TRACES}
  traces = os.path.join(wd, "traces", "traces.jsonl")

  # 1. In the trace step, after its first batch of rows; then a torn row, as a kill in a write.
  _killed(_run(env, wd, f"1:trace rows written to {traces}"), "in the trace step")
  assert 0 < len(_trace_keys(traces)) < len(_trace_keys(os.path.join(ref, "traces",
                                                                     "traces.jsonl")))
  assert not os.path.exists(done("traces"))
  with open(traces, "ab") as f:
    f.write(open(traces, "rb").readline()[:40])

  # 2. In the calibration step, once its checkpoint of step 2 is complete.
  p = _run(env, wd, f"2:started in {os.path.join(wd, 'calibrate', 'checkpoints')}")
  _killed(p, "in the calibration step")
  assert "dropped a torn last line" in p.stdout
  assert os.path.exists(done("traces")) and not os.path.exists(done("calibrate"))

  # 3. Between two steps: calibrate_hidden is done, infer not started.
  p = _run(env, wd, "1:chain step calibrate_hidden done")
  _killed(p, "between calibrate_hidden and infer")
  assert re.search(rf"resumed from {re.escape(os.path.join(wd, 'calibrate', 'checkpoints'))} "
                   r"step [23]\b", p.stdout), p.stdout[-3000:]
  assert not os.path.exists(os.path.join(wd, "infer"))

  # 4. In the inference step: the SFT baseline's predictions written, the policy's traces begun.
  infer_traces = os.path.join(wd, "infer", "test_close", "traces.jsonl")
  _killed(_run(env, wd, f"1:trace rows written to {infer_traces}"), "in the inference step")
  assert os.path.exists(os.path.join(wd, "infer", "predictions_SFT_test_open.jsonl"))
  assert not os.path.exists(os.path.join(wd, "infer", "eval_report.json"))

  p = _run(env, wd)
  assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
  for s in (*BEFORE_TRACES, *LATER):
    assert f"step {s}: finished before, skipped" in p.stdout
  for s in BEFORE_TRACES:
    assert os.path.getmtime(done(s)) == stamps[s]

  # The same results as the uninterrupted run, with no row duplicated or cut.
  same = lambda *rel: filecmp.cmp(os.path.join(ref, *rel), os.path.join(wd, *rel),
                                  shallow=False)
  assert same("results.json"), (open(os.path.join(ref, "results.md")).read(),
                                open(os.path.join(wd, "results.md")).read())
  assert json.load(open(os.path.join(wd, "infer", "eval_report.json"))) == json.load(
      open(os.path.join(ref, "infer", "eval_report.json")))
  predictions = sorted(f for f in os.listdir(os.path.join(ref, "infer"))
                       if f.startswith("predictions_"))
  assert len(predictions) == 8 and sorted(
      f for f in os.listdir(os.path.join(wd, "infer")) if f.startswith("predictions_")
  ) == predictions
  for name in predictions:
    rows = _lines(os.path.join(wd, "infer", name))
    assert len({r.get("item_id", r.get("id")) for r in rows}) == len(rows) == 2, name
    assert same("infer", name), name
  for rel in (("traces", "traces.jsonl"), ("infer", "test_close", "traces.jsonl"),
              ("infer", "test_open", "traces.jsonl")):
    assert _lines(os.path.join(wd, *rel)) == _lines(os.path.join(ref, *rel)), rel
    _trace_keys(os.path.join(wd, *rel))
  assert _lines(os.path.join(wd, "infer", "metrics.jsonl")) == _lines(
      os.path.join(ref, "infer", "metrics.jsonl"))  # each row once, not again per rerun
  for step in ("calibrate", "calibrate_hidden"):
    got = _losses(os.path.join(wd, step, "metrics.jsonl"))
    assert got == _losses(os.path.join(ref, step, "metrics.jsonl")) and len(got) == 3, step
  assert same("calibrate", "hf", "model.safetensors")
