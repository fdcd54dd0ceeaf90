"""Classification metrics: accuracy, macro-F1, per-class precision / recall / F1, the confusion
matrix, and, for scored predictions, expected calibration error and reliability-diagram data.

A prediction is a label string or None (no parseable answer); labels are compared stripped
and lower-cased. A prediction that is None or not one of the classes is "unparsed/invalid":
wrong for accuracy and recall, and a prediction of no class for F1 (a false negative of the
true class, a false positive of nothing). The confusion matrix has one row per true class and
one column per predicted class plus a last column for unparsed/invalid predictions.

Calibration (`scores`: per-item probability vectors over the classes, in class order): the
confidence of an item is its largest score, its prediction the argmax (which must be the
given prediction), its correctness whether that is the label. ECE uses `NUM_BINS` = 15
equal-width bins over [0, 1]; bin b (0-based) holds confidences in (b/15, (b+1)/15], i.e.
bins are closed on the right (a confidence exactly on an edge goes to the lower bin; 0 goes
to bin 0). ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over the non-empty bins.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

NUM_BINS = 15
UNPARSED = "unparsed/invalid"   # header of the confusion matrix's last column
SCORE_SUM_TOL = 1e-3            # |sum(scores) - 1| allowed (softmax in bf16 / float32)


def _norm(x: str | None) -> str | None:
  return None if x is None else x.strip().lower()


def bin_index(confidences: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
  """Bin of each confidence (see the module doc: (b/B, (b+1)/B], 0 -> bin 0). [n] int64."""
  edges = np.arange(num_bins + 1, dtype=np.float64) / num_bins  # each edge correctly rounded
  idx = np.searchsorted(edges, np.asarray(confidences, np.float64), side="left") - 1
  return np.clip(idx, 0, num_bins - 1)


def reliability(confidences: Sequence[float], correct: Sequence[bool],
                num_bins: int = NUM_BINS) -> dict[str, Any]:
  """Reliability-diagram data and ECE of `confidences` [n] with `correct` [n].

  Returns {"edges": [B+1], "count": [B] ints, "accuracy": [B], "confidence": [B] (mean
  accuracy / confidence of each bin, None for an empty bin), "ece": float (nan when n = 0)}.
  """
  conf = np.asarray(confidences, np.float64).reshape(-1)
  ok = np.asarray(correct, bool).reshape(-1)
  if conf.shape != ok.shape:
    raise ValueError(f"{conf.size} confidences for {ok.size} correctness flags")
  if num_bins < 1:
    raise ValueError(f"num_bins={num_bins} must be >= 1")
  if conf.size and (not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1):
    raise ValueError("confidences must be finite and in [0, 1]")
  idx = bin_index(conf, num_bins)
  count = np.bincount(idx, minlength=num_bins)
  acc_sum = np.bincount(idx, weights=ok.astype(np.float64), minlength=num_bins)
  conf_sum = np.bincount(idx, weights=conf, minlength=num_bins)
  nonempty = count > 0
  acc = np.where(nonempty, acc_sum / np.maximum(count, 1), np.nan)
  mean_conf = np.where(nonempty, conf_sum / np.maximum(count, 1), np.nan)
  n = conf.size
  ece = float(np.sum(count[nonempty] / n * np.abs(acc[nonempty] - mean_conf[nonempty]))) \
      if n else float("nan")
  as_list = lambda a: [None if np.isnan(v) else float(v) for v in a]  # JSON-friendly
  return {"edges": (np.arange(num_bins + 1) / num_bins).tolist(), "count": count.tolist(),
          "accuracy": as_list(acc), "confidence": as_list(mean_conf), "ece": ece}


def _check_scores(scores, n: int, classes: Sequence[str]) -> np.ndarray:
  num_classes = len(classes)
  rows = list(scores) if not isinstance(scores, np.ndarray) else scores
  if len(rows) and all(isinstance(r, Mapping) for r in rows):  # {label: p} per item
    for i, r in enumerate(rows):
      if sorted(r) != sorted(classes):
        raise ValueError(f"scores of item #{i} name {sorted(r)}; expected the classes "
                         f"{list(classes)}")
    rows = [[r[c] for c in classes] for r in rows]
  s = np.asarray(rows, np.float64)
  if s.shape != (n, num_classes):
    raise ValueError(f"scores have shape {s.shape}; expected (items, classes) = "
                     f"({n}, {num_classes})")
  if n == 0:
    return s
  bad = ~np.all(np.isfinite(s), axis=1) | (s.min(axis=1) < 0) \
      | (np.abs(s.sum(axis=1) - 1) > SCORE_SUM_TOL)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"scores of item #{i} are not a probability vector over the "
                     f"{num_classes} classes: {s[i].tolist()}")
  return s


def confusion_matrix(predictions: Sequence[str | None], labels: Sequence[str],
                     classes: Sequence[str]) -> np.ndarray:
  """[C, C + 1] int64: rows = true class, columns = predicted class, then unparsed/invalid.

  Raises ValueError when a label is not one of `classes` (naming the item's position)."""
  names = [_norm(c) for c in classes]
  col = {c: j for j, c in enumerate(names)}
  if len(col) != len(names):
    raise ValueError(f"classes {list(classes)} are not distinct (compared lower-cased)")
  cm = np.zeros((len(names), len(names) + 1), np.int64)
  for i, (p, y) in enumerate(zip(predictions, labels)):
    y = _norm(y)
    if y not in col:
      raise ValueError(f"label {y!r} of item #{i} is not one of the classes {list(classes)}")
    cm[col[y], col.get(_norm(p), len(names))] += 1
  return cm


def per_class(cm: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
  """Scalars of a confusion matrix [C, C + 1] (rows true, last column unparsed/invalid).

  precision/<c> = tp / (tp + fp), only when c was predicted at least once; recall/<c> =
  tp / (tp + fn), only when c has an example; f1/<c> = 2tp / (2tp + fp + fn), 0 when tp = 0;
  macro_f1 = the mean of f1/<c> over all classes (absent classes count as 0, as before);
  support/<c> = examples of c.
  """
  out: dict[str, float] = {}
  f1s = []
  for j, name in enumerate(classes):
    tp = int(cm[j, j])
    fp = int(cm[:, j].sum()) - tp
    fn = int(cm[j].sum()) - tp
    if tp + fp:
      out[f"precision/{name}"] = tp / (tp + fp)
    if tp + fn:
      out[f"recall/{name}"] = tp / (tp + fn)
    f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    out[f"f1/{name}"] = f1
    out[f"support/{name}"] = float(tp + fn)
    f1s.append(f1)
  out["macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
  return out


def classification_metrics(predictions: Sequence[str | None], labels: Sequence[str],
                           classes: Sequence[str] | None = None,
                           well_formatted: Sequence[bool] | None = None,
                           scores: Sequence[Sequence[float]] | np.ndarray | None = None,
                           *, num_bins: int = NUM_BINS) -> dict[str, Any]:
  """Metrics of `predictions` against `labels` (see the module doc).

  Args:
    predictions: [n] label strings or None.
    labels: [n] true labels, each one of `classes`; items labelled "" or None are left out
      of every metric and counted in "unlabelled".
    classes: the label set in order (default: the sorted labels seen); macro-F1 averages
      over it; the confusion matrix and `scores` follow its order.
    well_formatted: [n] format flags (e.g. prompts.is_well_formatted); gives format_rate.
    scores: [n, C] probability vectors in class order, or one {label: p} per item (rows sum
      to 1 within SCORE_SUM_TOL); each row's argmax must be the prediction (ties: the
      prediction must hold a largest score).
    num_bins: calibration bins.
  Returns: scalars {"n", "accuracy", "macro_f1", "answer_rate" (any answer parsed),
    "valid_rate" (the answer is a class), "format_rate"?, "chance" (1 / C), "majority_rate"
    (share of the split's most frequent true class), "top_prediction_rate" (share of items
    given the most often predicted class), "precision/<c>", "recall/<c>", "f1/<c>",
    "support/<c>", "ece"? (with scores)} and, for reports, "classes" [C] (as given),
    "confusion" [C][C + 1] ints and, with scores, "reliability" (see `reliability`).
    With n = 0 only "n", "classes", "confusion" (zeros) and "chance" are given.
  """
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  # Items without a label (an eval file may carry some) cannot be scored: they are left out
  # of every metric and counted, never scored as wrong or treated as an error.
  keep = [i for i, y in enumerate(labels) if y not in (None, "")]
  unlabelled = len(labels) - len(keep)
  if unlabelled:
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]
    predictions, labels = pick(predictions), pick(labels)
    well_formatted = pick(well_formatted) if well_formatted is not None and len(
        well_formatted) == len(keep) + unlabelled else well_formatted
    if scores is not None and len(scores) == len(keep) + unlabelled:
      scores = [scores[i] for i in keep]
  names = list(classes) if classes is not None else sorted(set(labels))
  n = len(labels)
  cm = confusion_matrix(predictions, labels, names)
  out: dict[str, Any] = {"n": float(n), "classes": names, "confusion": cm.tolist()}
  if unlabelled:
    out["unlabelled"] = float(unlabelled)
  if names:
    out["chance"] = 1.0 / len(names)
  if well_formatted is not None and len(well_formatted) != n:
    raise ValueError(f"{len(well_formatted)} format flags for {n} items")
  s = None if scores is None else _check_scores(scores, n, names)
  if n == 0:
    return out
  out["accuracy"] = float(np.trace(cm)) / n
  out["answer_rate"] = sum(p is not None for p in predictions) / n
  out["valid_rate"] = float(cm[:, :-1].sum()) / n
  out["majority_rate"] = float(cm.sum(axis=1).max()) / n
  out["top_prediction_rate"] = float(cm[:, :-1].sum(axis=0).max()) / n if names else 0.0
  out.update(per_class(cm, names))
  if well_formatted is not None:
    out["format_rate"] = sum(bool(w) for w in well_formatted) / n
  if s is not None:
    col = {_norm(c): j for j, c in enumerate(names)}
    pred_idx = np.array([col.get(_norm(p), -1) for p in predictions])
    for i, j in enumerate(pred_idx):
      if j < 0 or s[i, j] < s[i].max():
        raise ValueError(f"item #{i}: prediction {predictions[i]!r} is not the argmax of its "
                         f"scores {s[i].tolist()} over {names}")
    gold = np.array([col[_norm(y)] for y in labels])
    rel = reliability(s.max(axis=1), pred_idx == gold, num_bins)
    out["ece"] = rel["ece"]
    out["reliability"] = rel
  return out


def report_markdown(results: dict[str, dict[str, float]], *, step: int) -> str:
  """A short markdown table of split -> metrics (the eval report in the workdir).

  For several models, plots and warnings see `evals.report.write_report`."""
  cols = ["n", "accuracy", "macro_f1", "format_rate", "answer_rate"]
  lines = [f"# Evaluation at step {step}", "",
           "| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for split, m in results.items():
    cells = [("%d" % m[c]) if c == "n" else ("%.3f" % m[c]) if c in m else "-" for c in cols]
    lines.append(f"| {split} | " + " | ".join(cells) + " |")
  for split, m in results.items():
    rec = {k[len("recall/"):]: v for k, v in m.items() if k.startswith("recall/")}
    if rec:
      lines.append("")
      lines.append(f"{split} per-class recall: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()))
  return "\n".join(lines) + "\n"
