"""Reward curves of GRPO runs (and of their frozen-policy control) from their metrics.jsonl.

    runs = {"GRPO": "runs/x/grpo/metrics.jsonl", "frozen control": ".../grpo_control/..."}
    summary = write_reward_curves("runs/x", runs)   # runs/x/grpo_rewards.png

`summary[run][key]` = {"steps", "first_quarter", "last_quarter"}: the mean of the key over
the first and over the last quarter of the run's logged iterations, the figures the issue's
bar and the results table quote. Only rows that hold the key count (eval rows do not).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from deepintuit_jax.core import paths
from deepintuit_jax.evals import plots

REWARD_KEYS = ("reward/accuracy", "reward/format")
PNG = "grpo_rewards.png"


def run_name(control: bool) -> str:
  """A GRPO run's name in the plots and tables: its frozen control or the run itself."""
  return "frozen control" if control else "GRPO"


def read_series(metrics_path: str, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{key: (steps, values)} of the rows of a metrics.jsonl that hold the key (finite values
  only), in file order; keys found in no row are left out."""
  rows = [json.loads(line) for line in paths.read_text(metrics_path).splitlines() if line]
  out = {}
  for key in keys:
    pts = [(r["step"], float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    if pts:
      out[key] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
  return out


def quarter_means(values: Sequence[float]) -> tuple[float, float]:
  """(mean of the first quarter, mean of the last quarter) of the points, at least one each."""
  v = np.asarray(values, np.float64)
  if not len(v):
    raise ValueError("quarter_means: no points")
  q = max(len(v) // 4, 1)
  return float(v[:q].mean()), float(v[-q:].mean())


def summarize(series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
  out = {}
  for key, (steps, values) in series.items():
    first, last = quarter_means(values)
    out[key] = {"steps": int(steps[-1]), "points": len(values), "first_quarter": first,
                "last_quarter": last}
  return out


def write_reward_curves(out_dir: str, runs: Mapping[str, str], *,
                        keys: Sequence[str] = REWARD_KEYS, title: str = "GRPO rewards"
                        ) -> dict[str, Any]:
  """Plots each run's reward keys into `<out_dir>/grpo_rewards.png`; returns
  {"png": path or None, "runs": {run: summarize(...)}} (runs without a metrics file or
  without any of the keys are left out; no PNG when none remains)."""
  series = {}
  for name, path in runs.items():
    if paths.as_path(path).exists():
      s = read_series(path, keys)
      if s:
        series[name] = s
  if not series:
    return {"png": None, "runs": {}}
  png = plots.save_png(plots.curves_figure(series, keys, title=title), paths.join(out_dir, PNG))
  return {"png": png, "runs": {name: summarize(s) for name, s in series.items()}}


def markdown(summary: Mapping[str, Any]) -> str:
  """A small table: per run and key, the first- and last-quarter means and their change."""
  if not summary.get("runs"):
    return ""
  lines = ["## GRPO reward curves", "",
           f"![rewards]({PNG}) Mean of each reward over the first and the last quarter of the "
           "logged iterations (the frozen control rolls out the starting policy on the same "
           "prompts with the same keys).", "",
           "| run | reward | first quarter | last quarter | change |", "|---|---|---|---|---|"]
  for run, keys in summary["runs"].items():
    for key, s in keys.items():
      lines.append(f"| {run} | {key} | {s['first_quarter']:.3f} | {s['last_quarter']:.3f} | "
                   f"{s['last_quarter'] - s['first_quarter']:+.3f} |")
  return "\n".join(lines) + "\n"
