"""GRPO reward curves: the series read from metrics.jsonl, quarter means by hand, the PNG, the
markdown section and the results files' extra section."""
from __future__ import annotations

import json
import os

import pytest

from deepintuit_jax.evals import curves
from deepintuit_jax.evals import results as results_lib


def _metrics(path, values, *, key="reward/accuracy"):
  with open(path, "w") as f:
    for i, v in enumerate(values):
      f.write(json.dumps({"step": 2 * (i + 1), key: v, "reward/format": 1.0}) + "\n")
      if i == 1:  # an eval row between the training rows holds no reward
        f.write(json.dumps({"step": 4, "test_close/accuracy": 0.9}) + "\n")
  return str(path)


def test_series_skip_rows_without_the_key(tmp_path):
  path = _metrics(tmp_path / "m.jsonl", [0.0, 0.5, 1.0])
  s = curves.read_series(path, ("reward/accuracy", "reward/missing"))
  assert list(s) == ["reward/accuracy"]
  assert s["reward/accuracy"][0].tolist() == [2, 4, 6]
  assert s["reward/accuracy"][1].tolist() == [0.0, 0.5, 1.0]


def test_quarter_means_by_hand():
  assert curves.quarter_means([0, 0, 1, 1, 1, 1, 2, 2]) == (0.0, 2.0)  # quarters of 2 points
  assert curves.quarter_means([0.25, 0.75, 1.0]) == (0.25, 1.0)  # at least one point each


def test_write_reward_curves_and_results_section(tmp_path):
  runs = {"GRPO": _metrics(tmp_path / "g.jsonl", [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]),
          "frozen control": _metrics(tmp_path / "c.jsonl", [0.25] * 8),
          "absent": str(tmp_path / "none.jsonl")}
  summary = curves.write_reward_curves(str(tmp_path), runs)
  assert os.path.getsize(summary["png"]) > 1000 and summary["png"].endswith(curves.PNG)
  assert set(summary["runs"]) == {"GRPO", "frozen control"}
  g = summary["runs"]["GRPO"]["reward/accuracy"]
  assert (g["first_quarter"], g["last_quarter"], g["steps"], g["points"]) == (0.25, 1.0, 16, 8)
  md = curves.markdown(summary)
  assert "| GRPO | reward/accuracy | 0.250 | 1.000 | +0.750 |" in md
  assert "| frozen control | reward/accuracy | 0.250 | 0.250 | +0.000 |" in md
  results_lib.write_results(str(tmp_path), [], close="a", open_="b",
                            sections={"grpo_rewards": (md, summary["runs"])})
  with open(tmp_path / results_lib.RESULTS_JSON) as f:
    data = json.load(f)
  assert data["grpo_rewards"]["GRPO"]["reward/accuracy"]["last_quarter"] == 1.0
  assert "## GRPO reward curves" in (tmp_path / results_lib.RESULTS_MD).read_text()


def test_no_runs_no_png(tmp_path):
  assert curves.write_reward_curves(str(tmp_path), {"GRPO": str(tmp_path / "x")}) == {
      "png": None, "runs": {}}
  assert curves.markdown({"png": None, "runs": {}}) == ""
  with pytest.raises(ValueError, match="no points"):
    curves.quarter_means([])
