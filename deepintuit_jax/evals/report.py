"""The evaluation report of every evaluated model on every split.

    paths = report.write_report(out_dir, {"sft": {"test_close": m, "test_open": m2},
                                          "two_stage": {...}}, step=185, final=True)

`results` maps model -> split -> the dict of `metrics.classification_metrics`. Written to
`out_dir`: `eval_report.md` (a summary table of model x split with the chance level, warning
lines, then per model x split the per-class precision / recall / F1 and the confusion
matrix), `eval_report.json` ({"step", "final", "models": results, "warnings", "plots"}), and
PNG confusion matrices / reliability diagrams under `out_dir/plots/`. Both report files are
replaced atomically, so a reader never sees half a report; `final=True` marks the report of
a finished run (launch/sweep.py skips such runs).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from deepintuit_jax.core import paths
from deepintuit_jax.evals import metrics as metrics_lib

COLLAPSE_SHARE = 0.9   # a model giving one class to at least this share of items is flagged
REPORT_MD, REPORT_JSON, PLOTS_DIR = "eval_report.md", "eval_report.json", "plots"
Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


def _fmt(m: Mapping[str, Any], key: str, spec: str = "%.3f") -> str:
  v = m.get(key)
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return "%d" % v if key == "n" else spec % v


def majority(m: Mapping[str, Any]) -> tuple[str, float] | None:
  """(most frequent true class, its share of the split), or None for an empty split."""
  cm = np.asarray(m.get("confusion", []), np.int64)
  if cm.size == 0 or cm.sum() == 0:
    return None
  rows = cm.sum(axis=1)
  return m["classes"][int(np.argmax(rows))], float(rows.max() / cm.sum())


def collapse_warnings(results: Results, *, share: float = COLLAPSE_SHARE) -> list[str]:
  """One line per (model, split) that gives a single class (or no valid label) to at least
  `share` of the items: such a model has collapsed, whatever its accuracy says."""
  out = []
  for model, splits in results.items():
    for split, m in splits.items():
      cm = np.asarray(m.get("confusion", []), np.int64)
      n = int(cm.sum()) if cm.size else 0
      if n == 0:
        continue
      cols = cm.sum(axis=0)
      j = int(np.argmax(cols[:-1])) if cols.size > 1 else 0
      if cols.size > 1 and cols[j] >= share * n:
        out.append(f"WARNING: {model} on {split} predicts {m['classes'][j]!r} for "
                   f"{cols[j]}/{n} items ({cols[j] / n:.0%}): it has collapsed to one class.")
      if cols[-1] >= share * n:
        out.append(f"WARNING: {model} on {split} gives no valid label for {cols[-1]}/{n} "
                   f"items ({cols[-1] / n:.0%}).")
  return out


def _summary_table(results: Results) -> list[str]:
  lines = ["| model | split | n | accuracy | macro-F1 | format rate | valid rate | ECE | "
           "chance 1/C | majority class |", "|---" * 10 + "|"]
  for model, splits in results.items():
    for split, m in splits.items():
      maj = majority(m)
      lines.append(
          f"| {model} | {split} | {_fmt(m, 'n')} | {_fmt(m, 'accuracy')} | "
          f"{_fmt(m, 'macro_f1')} | {_fmt(m, 'format_rate')} | {_fmt(m, 'valid_rate')} | "
          f"{_fmt(m, 'ece')} | {_fmt(m, 'chance')} | "
          + ("-" if maj is None else f"{maj[1]:.3f} ({maj[0]})") + " |")
  return lines


def _split_section(model: str, split: str, m: Mapping[str, Any],
                   plots: Mapping[str, str]) -> list[str]:
  classes = list(m.get("classes", []))
  lines = [f"## {model} / {split}", ""]
  if not m.get("n"):
    return lines + ["No items.", ""]
  lines += ["| class | support | precision | recall | F1 |", "|---|---|---|---|---|"]
  for c in classes:
    lines.append(f"| {c} | {_fmt(m, f'support/{c}', '%d')} | {_fmt(m, f'precision/{c}')} | "
                 f"{_fmt(m, f'recall/{c}')} | {_fmt(m, f'f1/{c}')} |")
  if m.get("confusion") is not None:  # (metrics from before the confusion matrix lack it)
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(classes + [metrics_lib.UNPARSED]) + " |",
              "|---" * (len(classes) + 2) + "|"]
    for c, row in zip(classes, m["confusion"]):
      lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
  lines.append("")
  for kind, path in plots.items():
    lines += [f"![{kind} {model} {split}]({path})", ""]
  return lines


def to_markdown(results: Results, *, step: int | None = None, title: str = "Evaluation",
                plots: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None,
                share: float = COLLAPSE_SHARE) -> str:
  """The markdown report (see the module doc); `plots` {model: {split: {kind: rel. path}}}."""
  head = title + ("" if step is None else f" at step {step}")
  lines = [f"# {head}", "", *_summary_table(results), "",
           "Chance level: 1/C is a uniform guess; the majority-class rate is what always "
           "predicting the split's most frequent class scores.", ""]
  warnings = collapse_warnings(results, share=share)
  lines += [*warnings, ""] if warnings else []
  for model, splits in results.items():
    for split, m in splits.items():
      lines += _split_section(model, split, m, (plots or {}).get(model, {}).get(split, {}))
  return "\n".join(lines).rstrip() + "\n"


def _jsonable(x: Any) -> Any:
  """Plain JSON values (NaN / inf -> None, NumPy -> Python)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_report(out_dir: str, results: Results, *, step: int | None = None,
                 final: bool = False, title: str = "Evaluation", plots: bool = True,
                 tensorboard=None, share: float = COLLAPSE_SHARE) -> dict[str, Any]:
  """Writes eval_report.md, eval_report.json and (plots=True) the PNGs to `out_dir`.

  Args:
    results: {model: {split: classification_metrics dict}}.
    step: the training step the models are at (shown in the title; None = not shown).
    final: this is the finished run's report (recorded in the JSON).
    tensorboard: a tensorboardX SummaryWriter; the figures are also written there as images.
    share: the collapse-warning threshold.
  Returns {"markdown": path, "json": path, "plots": {model: {split: {kind: path}}},
    "warnings": [lines]}.
  """
  from deepintuit_jax.evals import plots as plots_lib  # matplotlib only when plotting
  paths.makedirs(out_dir)
  pngs = plots_lib.write_plots(os.path.join(out_dir, PLOTS_DIR), results) if plots else {}
  rel = {m: {s: {k: os.path.relpath(p, out_dir) for k, p in kinds.items()}
             for s, kinds in splits.items()} for m, splits in pngs.items()}
  if tensorboard is not None:
    plots_lib.add_to_tensorboard(tensorboard, results, step=step or 0)
  warnings = collapse_warnings(results, share=share)
  md_path, json_path = os.path.join(out_dir, REPORT_MD), os.path.join(out_dir, REPORT_JSON)
  paths.write_text(md_path, to_markdown(results, step=step, title=title, plots=rel, share=share))
  paths.write_text(json_path, json.dumps(_jsonable(
      {"step": step, "final": bool(final), "models": results, "warnings": warnings,
       "plots": rel}), indent=1, sort_keys=True) + "\n")
  return {"markdown": md_path, "json": json_path, "plots": pngs, "warnings": warnings}


def read_report(path: str) -> dict[str, Any]:
  """An eval_report.json (or the folder holding it) as {"step", "final", "models": {model:
  {split: metrics}}}; the older single-model form {"step", "splits"} reads as model "model"
  with final unknown (None)."""
  if paths.isdir(path):
    path = os.path.join(path, REPORT_JSON)
  data = paths.read_json(path)
  if not isinstance(data, dict) or not ("models" in data or "splits" in data):
    raise ValueError(f"{path}: not an eval report (no 'models' or 'splits' key)")
  if "models" not in data:
    return {"step": data.get("step"), "final": None, "models": {"model": data["splits"]}}
  return data
