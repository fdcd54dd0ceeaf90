"""GRPO advantage estimators against NumPy loop transcriptions of verl's formulas and a
hand-worked case; group-of-one behaviour, registry and input errors."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from deepintuit_jax.algorithms.grpo import advantages


def _groups(r, g):
  return [list(r[i:i + g]) for i in range(0, len(r), g)]


def _ref_grpo(r, g, eps=1e-6, std=True):
  out = []
  for grp in _groups(r, g):
    if len(grp) == 1:
      mean, sd = 0.0, 1.0
    else:
      mean = sum(grp) / len(grp)
      sd = (sum((x - mean) ** 2 for x in grp) / (len(grp) - 1)) ** 0.5
    out += [(x - mean) / (sd + eps) if std else x - mean for x in grp]
  return np.array(out)


def _ref_rloo(r, g):
  out = []
  for grp in _groups(r, g):
    if len(grp) == 1:
      out += grp
      continue
    for i, x in enumerate(grp):
      others = grp[:i] + grp[i + 1:]
      out.append(x - sum(others) / len(others))
  return np.array(out)


def _ref_rpp(r, g, lengths):
  # verl whitens the group-centred score broadcast over each response's tokens.
  centred = _ref_grpo(r, g, std=False)
  tokens = np.concatenate([np.full(n, x) for x, n in zip(centred, lengths)])
  var = tokens.var(ddof=1)
  return (centred - tokens.mean()) / np.sqrt(var + 1e-8)


def test_hand_worked_case():
  r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]   # two prompts, G = 4
  # group 1: mean 0.5, unbiased std sqrt(1/3) = 0.57735; group 2: all equal -> 0.
  np.testing.assert_allclose(advantages.compute("grpo", r, group_size=4),
                             [0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(advantages.compute("dr_grpo", r, group_size=4),
                             [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-6)
  # rloo: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3.
  np.testing.assert_allclose(advantages.compute("rloo", r, group_size=4),
                             [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], atol=1e-6)


@pytest.mark.parametrize("g", [1, 2, 3, 8])
def test_against_numpy_transcription(g):
  rng = np.random.default_rng(g)
  r = rng.integers(0, 3, size=5 * g).astype(np.float64) + rng.normal(0, 0.1, 5 * g) * (g % 2)
  lengths = rng.integers(1, 20, size=5 * g)
  np.testing.assert_allclose(advantages.compute("grpo", r, group_size=g), _ref_grpo(r, g),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(advantages.compute("dr_grpo", r, group_size=g),
                             _ref_grpo(r, g, std=False), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(advantages.compute("rloo", r, group_size=g), _ref_rloo(r, g),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      advantages.compute("reinforce_plus_plus_baseline", r, group_size=g, lengths=lengths),
      _ref_rpp(r, g, lengths), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      advantages.compute("reinforce_plus_plus_baseline", r, group_size=g),
      _ref_rpp(r, g, np.ones_like(lengths)), rtol=1e-4, atol=1e-4)


def test_group_of_one_follows_verl():
  r = [1.0, 0.0, 2.0]
  np.testing.assert_allclose(advantages.compute("grpo", r, group_size=1),
                             np.array(r) / (1 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(advantages.compute("dr_grpo", r, group_size=1), r)
  np.testing.assert_allclose(advantages.compute("rloo", r, group_size=1), r)


def test_jit_and_dtype():
  f = jax.jit(lambda x: advantages.compute("grpo", x, group_size=4))
  out = f(np.arange(8, dtype=np.float32))
  assert out.shape == (8,) and out.dtype == np.float32
  np.testing.assert_allclose(out, _ref_grpo(list(range(8)), 4), rtol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="not a multiple of group_size=4"):
    advantages.compute("grpo", np.zeros(6), group_size=4)
  with pytest.raises(ValueError, match=r"unknown advantage estimator 'gpro'; known: .*grpo"):
    advantages.compute("gpro", np.zeros(4), group_size=2)
  with pytest.raises(ValueError, match="1-D"):
    advantages.compute("grpo", np.zeros((2, 2)), group_size=2)
  with pytest.raises(ValueError, match="positive int"):
    advantages.compute("grpo", np.zeros(4), group_size=0)
  with pytest.raises(ValueError, match="lengths shape"):
    advantages.compute("reinforce_plus_plus_baseline", np.zeros(4), group_size=2, lengths=[1, 2])
  with pytest.raises(ValueError, match="already registered"):
    advantages.register("grpo")(lambda r: r)
