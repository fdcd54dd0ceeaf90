"""launch/aot_check.py --step=grpo lowers the GRPO update step (policy loss, GRPO's
per-row arrays sharded with the batch) from shapes alone. Lowering only: the SFT check
already compiles the same step machinery, and a compile here costs minutes on 2 shared cores."""
from __future__ import annotations

import jax

from tests.unit.test_aot_check import _load


def test_tiny_grpo_step_lowers_on_a_2x2x2_mesh():
  assert jax.device_count() == 8
  out = _load().main(["--step=grpo", "--size=tiny", "--mesh=2,2,2", "--batch=8",
                      "--frames=4", "--side=56", "--text=32", "--frozen=", "--loss_chunk=64",
                      "--no_compile"])["grpo"]
  assert out["groups"] == 4 and out["frozen"] == 0 and out["trainable"] > 0
  # 8 rows of G = 8 are one prompt: it cannot split over 4 groups, so one row per response.
  assert out["layout"] == "one prompt ++ response row per response"


def test_tiny_prompt_shared_grpo_step_lowers_on_a_2x2x2_mesh():
  """G = 2: the 8 rows are 4 prompts, one per batch group, each under its 2 responses (the
  learner's prompt-shared batch); --no-share_prompt gives the rows again."""
  args = ["--step=grpo", "--size=tiny", "--mesh=2,2,2", "--batch=8", "--group=2",
          "--frames=4", "--side=56", "--text=32", "--frozen=", "--loss_chunk=64",
          "--no_compile"]
  shared = _load().main(args)["grpo"]
  rows = _load().main(args + ["--no-share_prompt"])["grpo"]
  assert shared["layout"].startswith("prompt-shared: 4 prompt(s)")
  assert rows["layout"] == "one prompt ++ response row per response"
