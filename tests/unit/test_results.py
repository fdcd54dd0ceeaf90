"""The chain's results table from fixed metric files: rows in step order (then each step's
report_order.json), values read from the reports, the open drop, ECE only with scores, and
a step added later (the imitation baseline) plugging in by writing its report."""
from __future__ import annotations

import json
import os

from deepintuit_jax.evals import report, results


def _m(acc, f1, n=4, ece=None):
  out = {"n": n, "accuracy": acc, "macro_f1": f1, "classes": ["a", "b"],
         "confusion": [[1, 1, 0], [1, 1, 0]]}
  if ece is not None:
    out["ece"] = ece
  return out


def test_table_from_fixed_reports(tmp_path):
  wd = str(tmp_path)
  report.write_report(os.path.join(wd, "imitation"), {
      "imitation (scratch)": {"test_close": _m(0.5, 0.4), "test_open": _m(0.25, 0.2)},
      "imitation (pretrained tower)": {"test_close": _m(0.75, 0.7), "test_open": _m(0.5, 0.45)},
  }, plots=False, final=True)
  report.write_report(os.path.join(wd, "infer"), {
      "SFT": {"test_close": _m(0.5, 0.5), "test_open": _m(0.5, 0.5)},
      "SFT + GRPO + calibration (label token)": {
          "test_close": _m(1.0, 1.0, ece=0.125), "test_open": _m(0.75, 0.6, ece=0.25)},
      "SFT + GRPO": {"test_close": _m(0.75, 0.7)},  # no open split evaluated
  }, plots=False, final=True)
  with open(os.path.join(wd, "infer", results.ORDER_FILE), "w") as f:
    json.dump(["SFT", "SFT + GRPO", "SFT + GRPO + calibration (label token)"], f)
  os.makedirs(os.path.join(wd, "traces"))  # a step without a report adds no row
  reports = results.collect_reports(wd, ["imitation", "sft", "traces", "infer"])
  rows = results.results_rows(reports, close="test_close", open_="test_open")
  assert [r["model"] for r in rows] == [
      "imitation (pretrained tower)", "imitation (scratch)", "SFT", "SFT + GRPO",
      "SFT + GRPO + calibration (label token)"]
  by = {r["model"]: r for r in rows}
  cal = by["SFT + GRPO + calibration (label token)"]
  assert (cal["close_accuracy"], cal["open_macro_f1"], cal["close_ece"], cal["open_ece"]) == (
      1.0, 0.6, 0.125, 0.25)
  assert cal["open_drop"] == 0.25 and by["imitation (scratch)"]["open_drop"] == 0.25
  assert by["SFT"]["close_ece"] is None and by["SFT + GRPO"]["open_accuracy"] is None
  assert by["SFT + GRPO"]["open_drop"] is None and cal["step"] == "infer"
  paths = results.write_results(wd, rows, close="test_close", open_="test_open")
  md = open(paths["markdown"]).read()
  assert "| SFT + GRPO + calibration (label token) | 1.000 | 1.000 | 0.750 | 0.600 | 0.250 | " \
         "0.125 | 0.250 |" in md
  assert "| SFT + GRPO | 0.750 | 0.700 | - | - | - | - | - |" in md
  assert json.load(open(paths["json"]))["rows"][0]["model"] == "imitation (pretrained tower)"


def test_single_model_report_named_after_its_step(tmp_path):
  os.makedirs(tmp_path / "sft")
  with open(tmp_path / "sft" / report.REPORT_JSON, "w") as f:
    json.dump({"step": 3, "splits": {"test_close": _m(0.5, 0.5)}}, f)
  rows = results.results_rows(results.collect_reports(str(tmp_path), ["sft"]),
                              close="test_close", open_="test_open")
  assert [r["model"] for r in rows] == ["sft"] and rows[0]["close_accuracy"] == 0.5
