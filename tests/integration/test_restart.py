"""One workdir through Ctrl-C, resume, a finished rerun, `--rerun_eval` and a refused
config change (pulse runs of `main` in subprocesses, in order): metrics.jsonl keeps exactly
one row per step and per eval, and a refused run touches no file. The export it writes
decodes its tags with skip_special_tokens=True and carries the training's pixel settings."""
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
STEPS = 30  # enough steps after the first checkpoint for SIGINT to land inside the loop
ARGS = ["--config=configs/sft.py:pulse", "--config.train.batch_size=2",
        "--config.data.max_frames=4", "--config.data.max_pixels=12544",
        "--config.eval.batch_size=4", "--config.data.synthetic_train=12",
        "--config.data.synthetic_test=2", f"--config.train.num_steps={STEPS}",
        "--config.checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "deepintuit_jax.main", f"--workdir={workdir}", *ARGS, *extra]


def _run(env, workdir, *extra):
  return subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _kinds(workdir):
  """(step, kind) of every row: train, eval/<split>, data."""
  out = []
  for r in _rows(workdir):
    kind = f"eval/{r['split']}" if "split" in r else "data" if "skipped/total" in r else "train"
    out.append((r["step"], kind))
  return out


def _files(workdir):
  out = {}
  for root, _, names in os.walk(workdir):
    for n in names:
      p = os.path.join(root, n)
      out[p] = os.stat(p).st_mtime_ns
  return out


def test_ctrl_c_resume_finished_rerun_eval_and_refusal(env, tmp_path):
  w = str(tmp_path / "run")
  # 1. Ctrl-C once the first checkpoint exists: a checkpoint of the last step, no traceback.
  proc = subprocess.Popen(_cmd(w), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  while (not os.path.isdir(os.path.join(w, "checkpoints", "2")) and proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, (proc.returncode, err[-3000:])
  assert "Traceback" not in err and "checkpoint saved" in err, err[-3000:]
  stopped = int(err.split("a rerun resumes from step ")[1].split()[0])
  assert 2 <= stopped < STEPS
  assert str(stopped) in os.listdir(os.path.join(w, "checkpoints"))
  assert [s for s, k in _kinds(w)] == list(range(1, stopped + 1))  # no eval yet
  # 2. The rerun resumes there and finishes: one row per step, one per eval split.
  p = _run(env, w)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"resumed from {os.path.join(w, 'checkpoints')} step {stopped}" in p.stdout
  want = [(s, "train") for s in range(1, STEPS + 1)] + [
      (STEPS, "data"), (STEPS, "eval/test_close"), (STEPS, "eval/test_open")]
  assert _kinds(w) == want
  for notice in ("PyTorch was not found", "rope_scaling", "Unrecognized keys"):
    assert notice not in p.stdout + p.stderr
  # 3. A finished run is not redone.
  before = _files(w)
  p = _run(env, w)
  assert p.returncode == 0 and "this run is finished (step 30" in p.stdout, p.stderr[-2000:]
  assert _files(w) == before
  # 4. Unless asked: eval and export again, still one row per eval.
  p = _run(env, w, "--rerun_eval")
  assert p.returncode == 0, p.stderr[-3000:]
  assert _kinds(w) == want
  assert os.stat(os.path.join(w, "eval_report.md")).st_mtime_ns > before[
      os.path.join(w, "eval_report.md")]
  # 5. A config that changes the numbers is refused, touching nothing.
  before = _files(w)
  p = _run(env, w, "--config.train.learning_rate=0.01", "--config.train.log_every=3")
  assert p.returncode == 2 and "Traceback" not in p.stderr
  # the recorded config holds the number the run used (the tiny recipe's 1e-3), not a sentinel
  assert "train.learning_rate: 0.001 -> 0.01" in p.stderr and "log_every" not in p.stderr
  assert "--allow_config_change" in p.stderr and "--workdir" in p.stderr
  assert _files(w) == before
  # The export: tags and labels survive vLLM's / transformers' default decoding, and the
  # processor files say how training preprocessed (max_pixels 12544, 4 frames).
  from transformers import AutoTokenizer
  hf = os.path.join(w, "hf")
  tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
  text = "<think>a</think>\n<answer>moving_left</answer>"
  ids = tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert len(tok.encode("moving_left", add_special_tokens=False)) == 1
  video = json.load(open(os.path.join(hf, "video_preprocessor_config.json")))
  image = json.load(open(os.path.join(hf, "preprocessor_config.json")))
  assert video["size"]["longest_edge"] == image["max_pixels"] == 12544
  assert video["max_frames"] == 4
