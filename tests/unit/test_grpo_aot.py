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
