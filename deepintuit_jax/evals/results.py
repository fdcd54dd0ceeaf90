"""The chain's results table: one row per evaluated model, from the steps' eval reports.

    reports = collect_reports(workdir, ["imitation", "sft", ..., "infer"])
    rows = results_rows(reports, close="test_close", open_="test_open")
    write_results(workdir, rows, close="test_close", open_="test_open")

Any step whose sub-workdir holds an `eval_report.json` (evals.report.write_report, or the
older single-model form) contributes its models, in step order then in the order of the
step's `report_order.json` (a JSON list of model names; else the report's own order): a new
stage (e.g. the imitation baseline) plugs in by writing its report. Columns: accuracy and
macro-F1 on the close- and open-instance splits, the open-instance drop (close minus open
accuracy), ECE on each split where the model gives scores. Values are read, never computed
here, except the drop.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from deepintuit_jax.core import paths
from deepintuit_jax.evals import report

RESULTS_MD, RESULTS_JSON = "results.md", "results.json"
ORDER_FILE = "report_order.json"  # optional: a step's model names in the order to list them
COLUMNS = (("close_accuracy", "close acc"), ("close_macro_f1", "close macro-F1"),
           ("open_accuracy", "open acc"), ("open_macro_f1", "open macro-F1"),
           ("open_drop", "open drop (acc)"), ("close_ece", "ECE close"), ("open_ece", "ECE open"))


def collect_reports(workdir: str, steps: Sequence[str]) -> list[tuple[str, Mapping[str, Any]]]:
  """[(step, {model: {split: metrics}})] for each step with an eval report, in order. A
  single-model report's model is named after its step."""
  out = []
  for step in steps:
    path = os.path.join(workdir, step, report.REPORT_JSON)
    if not paths.isfile(path):
      continue
    models = dict(report.read_report(path)["models"])
    order_file = os.path.join(workdir, step, ORDER_FILE)
    if paths.isfile(order_file):  # the report JSON sorts its keys; the step's own order
      order = [m for m in paths.read_json(order_file) if m in models]
      models = {m: models[m] for m in order + [m for m in models if m not in order]}
    if list(models) == ["model"]:
      models = {step: models["model"]}
    out.append((step, models))
  return out


def _get(m: Mapping[str, Any] | None, key: str) -> float | None:
  v = None if m is None else m.get(key)
  return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def results_rows(reports: Sequence[tuple[str, Mapping[str, Any]]], *, close: str,
                 open_: str) -> list[dict[str, Any]]:
  """One row per (step, model): {"model", "step", "<split>_n", the COLUMNS values (None
  where a split or a score is missing)}. A model named twice keeps its first row."""
  rows, seen = [], set()
  for step, models in reports:
    for model, splits in models.items():
      if model in seen:
        continue
      seen.add(model)
      row: dict[str, Any] = {"model": model, "step": step}
      for key, split in (("close", close), ("open", open_)):
        m = splits.get(split)
        row[f"{key}_n"] = _get(m, "n")
        row[f"{key}_accuracy"] = _get(m, "accuracy")
        row[f"{key}_macro_f1"] = _get(m, "macro_f1")
        row[f"{key}_ece"] = _get(m, "ece")
      a, b = row["close_accuracy"], row["open_accuracy"]
      row["open_drop"] = None if a is None or b is None else a - b
      rows.append(row)
  return rows


def to_markdown(rows: Sequence[Mapping[str, Any]], *, close: str, open_: str) -> str:
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  n = lambda key: next((int(r[key]) for r in rows if r.get(key) is not None), None)
  lines = ["# DeepIntuit results", "",
           f"Close-instance split: `{close}` (n={n('close_n')}); open-instance split: "
           f"`{open_}` (n={n('open_n')}). Open drop = close minus open accuracy. ECE (15 bins) "
           "only for models that give scores.", "",
           "| model | " + " | ".join(h for _, h in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]
  for r in rows:
    lines.append(f"| {r['model']} | " + " | ".join(fmt(r[k]) for k, _ in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, rows: Sequence[Mapping[str, Any]], *, close: str,
                  open_: str, sections: Mapping[str, tuple[str, Any]] | None = None
                  ) -> dict[str, str]:
  """results.md and results.json ({"close_split", "open_split", "rows"}), atomically.
  sections: name -> (markdown appended to results.md, value stored under name in the JSON)."""
  md, js = os.path.join(workdir, RESULTS_MD), os.path.join(workdir, RESULTS_JSON)
  sections = dict(sections or {})
  text_md = "\n".join([to_markdown(rows, close=close, open_=open_)]
                      + [m for m, _ in sections.values() if m])
  data = {"close_split": close, "open_split": open_, "rows": list(rows)}
  data.update({name: v for name, (_, v) in sections.items()})
  for path, text in ((md, text_md), (js, json.dumps(data, indent=1) + "\n")):
    paths.write_text(path, text)
  return {"markdown": md, "json": js}
