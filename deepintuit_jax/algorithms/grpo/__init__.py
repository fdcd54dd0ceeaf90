"""GRPO (RECIPE.md "Stage 1"): rewards, advantage estimators and policy losses.

    from deepintuit_jax.algorithms.grpo import rewards, advantages, loss

Each is a small registry of pure functions, named as verl's so results compare.
"""
from __future__ import annotations

from deepintuit_jax.algorithms.grpo import advantages, loss, rewards

__all__ = ["advantages", "loss", "rewards"]
