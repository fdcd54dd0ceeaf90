"""eval_report.md / .json, collapse warnings, PNG plots and TensorBoard images."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from deepintuit_jax.evals import metrics, plots, report

CLASSES = ["a", "b", "c"]


def _results():
  # sft: 10 items, predicts "a" for 9 of them (90%: collapsed); calibrated: scored.
  labels = ["a"] * 4 + ["b"] * 3 + ["c"] * 3
  sft = metrics.classification_metrics(["a"] * 9 + [None], labels, classes=CLASSES,
                                       well_formatted=[True] * 9 + [False])
  scores = np.full((10, 3), 0.1)
  for i, y in enumerate(labels):
    scores[i, CLASSES.index(y)] = 0.8
  scores[9] = [0.1, 0.8, 0.1]  # the last c item is called b
  preds = [CLASSES[int(j)] for j in scores.argmax(1)]
  cal = metrics.classification_metrics(preds, labels, classes=CLASSES, scores=scores)
  empty = metrics.classification_metrics([], [], classes=CLASSES)
  return {"sft": {"test_close": sft, "test_open": empty}, "two_stage": {"test_close": cal}}


def test_collapse_warnings():
  res = _results()
  w = report.collapse_warnings(res)
  assert len(w) == 1 and "sft on test_close predicts 'a' for 9/10 items (90%)" in w[0]
  assert report.collapse_warnings(res, share=0.95) == []
  nothing = metrics.classification_metrics([None, None], ["a", "b"], classes=CLASSES)
  (line,) = report.collapse_warnings({"m": {"s": nothing}})
  assert "no valid label for 2/2 items" in line


def test_write_report(tmp_path):
  res = _results()
  out = report.write_report(str(tmp_path), res, step=7, final=True)
  md = open(out["markdown"]).read()
  assert md.startswith("# Evaluation at step 7")
  # Summary row: n, accuracy 4/10, macro-F1 (a: 2*4/(8+5+0)=8/13, b, c 0) / 3, format 0.9,
  # valid 0.9, no ECE, chance 1/3, majority a (4/10).
  assert "| sft | test_close | 10 | 0.400 | 0.205 | 0.900 | 0.900 | - | 0.333 | 0.400 (a) |" in md
  assert "| sft | test_open | 0 | - | - | - | - | - | 0.333 | - |" in md
  assert "| two_stage | test_close | 10 | 0.900 |" in md
  assert "WARNING: sft on test_close predicts 'a'" in md
  assert "| a | 4 | 0.444 | 1.000 | 0.615 |" in md          # per-class P/R/F1
  assert "| b | 3 | - | 0.000 | 0.000 |" in md              # b never predicted
  assert "| true \\ predicted | a | b | c | unparsed/invalid |" in md
  assert "| c | 2 | 0 | 0 | 1 |" in md  # sft: two c items called a, the last unparsed
  assert "![confusion sft test_close](plots/confusion_sft_test_close.png)" in md
  assert "![reliability two_stage test_close](plots/reliability_two_stage_test_close.png)" in md
  data = json.load(open(out["json"]))
  assert data["final"] is True and data["step"] == 7
  assert data["models"]["two_stage"]["test_close"]["ece"] == pytest.approx(
      res["two_stage"]["test_close"]["ece"])
  assert data["warnings"] == out["warnings"]
  # Files: a confusion matrix per non-empty split, a reliability diagram where scored.
  names = sorted(os.listdir(tmp_path / "plots"))
  assert names == ["confusion_sft_test_close.png", "confusion_two_stage_test_close.png",
                   "reliability_two_stage_test_close.png"]
  for n in names:
    blob = (tmp_path / "plots" / n).read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 2000
  assert report.read_report(str(tmp_path))["models"]["sft"]["test_close"]["n"] == 10


def test_read_legacy_report(tmp_path):
  p = tmp_path / "eval_report.json"
  p.write_text(json.dumps({"step": 3, "splits": {"test": {"n": 2, "accuracy": 0.5}}}))
  r = report.read_report(str(p))
  assert r["final"] is None and r["models"]["model"]["test"]["accuracy"] == 0.5
  p.write_text("[]")
  with pytest.raises(ValueError, match="not an eval report"):
    report.read_report(str(p))


def test_metrics_without_confusion(tmp_path):
  # A metrics dict of the older shape (no classes / confusion): table only, no plots.
  out = report.write_report(str(tmp_path), {"m": {"s": {"n": 2, "accuracy": 0.5}}})
  md = open(out["markdown"]).read()
  assert "| m | s | 2 | 0.500 | - |" in md and out["plots"] == {} and out["warnings"] == []


def test_tensorboard_images(tmp_path):
  class Recorder:
    def __init__(self):
      self.images = {}

    def add_image(self, tag, img, step, dataformats):
      assert dataformats == "HWC"
      self.images[tag] = (img, step)

  rec = Recorder()
  assert plots.add_to_tensorboard(rec, _results(), step=5) == 3
  img, step = rec.images["eval/two_stage/test_close/reliability"]
  assert step == 5 and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert img.std() > 0  # something was drawn
  # And with tensorboardX's writer: an events file is written.
  from tensorboardX import SummaryWriter
  w = SummaryWriter(str(tmp_path / "tb"))
  report.write_report(str(tmp_path / "r"), _results(), tensorboard=w, plots=False)
  w.close()
  (events,) = os.listdir(tmp_path / "tb")
  assert os.path.getsize(tmp_path / "tb" / events) > 10000
  assert not os.path.exists(tmp_path / "r" / "plots")


def test_confusion_figure_checks_shape():
  with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
    plots.confusion_figure([[1, 0], [0, 1]], ["a", "b"])
