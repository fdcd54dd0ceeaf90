"""benchmarks/grpo_step.py on an HF export: our side of the TRL comparison (the GRPO stage's
set-up, the generated benchmark's prompts, the peer's workload, the per-part report). The
peer itself (benchmarks/trl_grpo_peer.py, TRL in another environment) never runs here: only
its plain reward functions are checked against ours."""
import json
import os

import numpy as np
import pytest

from tests.scripts import load_script

from deepintuit_jax.data import prompts
from deepintuit_jax.models import tiny


@pytest.fixture(scope="module")
def grpo_step():
  return load_script("benchmarks", "grpo_step.py")


def test_peer_rewards_match_ours():
  peer = load_script("benchmarks", "trl_grpo_peer.py")
  cases = [
      "<think>a</think><answer>growing</answer>",
      " <think>\nx\n</think>\n<answer> Growing </answer><|im_end|>",
      "<think>a</think><answer>growing</answer><|im_end|><|im_end|>",
      "<think>a</think> junk <answer>growing</answer>",
      "<think>a<answer>b</answer></think><answer>growing</answer>",
      "<think>a <|video_pad|></think><answer>growing</answer>",
      "<think>a</think><answer>grow<NO_POLICY>ing</answer>",
      "<answer>growing</answer>",
      "<think>a</think><answer>shrinking</answer>",
      "",
  ]
  for text in cases:
    assert peer.well_formed(text) == prompts.is_well_formatted(text), text
    for label in ("growing", " GROWING ", "shrinking"):
      assert peer.correct(text, label) == prompts.answer_matches(text, label), (text, label)


def test_side_by_side_table(grpo_step):
  ours = grpo_step.iteration_parts(dict(iteration_time=2.0, iteration_cpu_time=1.9,
                                        rollout_time=0.5, reward_time=0.1,
                                        old_logp_time=0.3, update_time=1.1))
  assert ours["rollout"] == pytest.approx(0.4) and ours["other"] == pytest.approx(0.1)
  theirs = dict(iteration=6.0, iteration_cpu=5.7, rollout=3.0, rewards=0.1, logprobs=0.0,
                update=2.8, other=0.1)
  table = grpo_step.side_by_side(ours, theirs).splitlines()
  assert table[0] == "| part | ours s | TRL s | TRL / ours |"
  assert "| one iteration | 2.000 | 6.000 | 3.0x |" in table
  assert "| rollout (generation) | 0.400 | 3.000 | 7.5x |" in table
  assert "| old log-probs | 0.300 | 0.000 | - |" in table  # a part one side skips


@pytest.mark.slow
def test_export_workload_runs_and_writes_the_peer_workload(grpo_step, tmp_path, monkeypatch):
  monkeypatch.setenv("DEEPINTUIT_CACHE", str(tmp_path / "cache"))
  ckpt = tiny.write_tiny_checkpoint(str(tmp_path / "hf"), seed=0)
  peer = tmp_path / "peer"
  out = grpo_step.main([f"--checkpoint={ckpt}", "--synthetic=4", "--prompts=2", "--group=2",
                        "--mini=1", "--new=4", "--iters=1", "--dtype=float32",
                        f"--peer_dir={peer}"])
  assert set(out["median"]) == set(grpo_step.PARTS)
  assert all(np.isfinite(v) and v >= 0 for k, v in out["median"].items() if k != "other")
  assert out["padded_length"] >= 4
  w = json.loads((peer / "workload.json").read_text())
  assert (w["group"], w["prompts_per_iteration"], w["mini_batch_prompts"], w["new"]) == (
      2, 2, 1, 4)
  assert w["checkpoint"] == os.path.abspath(ckpt) and w["clip_low"] == 0.2
  assert len(w["prompts"]) == 2
  import cv2
  for q in w["prompts"]:
    t, h, wd = q["video_grid_thw"]
    image = cv2.imread(str(peer / q["image"]))
    # One image of the video's patches: grid (1, h, t*w), the same vision tokens.
    assert image.shape == (h * 14, t * wd * 14, 3) == (*q["image_hw"], 3)
    assert q["prompt_ids"].count(tiny.TOKEN_IDS["<|video_pad|>"]) == t * h * wd // 4
    assert q["label"] and "<answer>" in q["text"]
