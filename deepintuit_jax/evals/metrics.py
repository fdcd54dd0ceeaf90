"""Classification metrics over parsed answers: accuracy, macro-F1, per-class recall, format rate.

A prediction is a label string or None (no parseable answer). Unparseable or unknown
answers count as wrong for accuracy and recall, and as a prediction of no class for F1
(a false negative of the true class, a false positive of nothing).
"""
from __future__ import annotations

from typing import Sequence


def _norm(x: str | None) -> str | None:
  return None if x is None else x.strip().lower()


def classification_metrics(predictions: Sequence[str | None], labels: Sequence[str],
                           classes: Sequence[str] | None = None,
                           well_formatted: Sequence[bool] | None = None) -> dict[str, float]:
  """Metrics of `predictions` against `labels` (compared stripped and lower-cased).

  classes: the label set (default: the labels seen); macro-F1 averages over it, per-class
    recall is reported for each class with at least one example.
  well_formatted: per-item format flags (e.g. prompts.is_well_formatted); gives format_rate.
  Returns {"n", "accuracy", "macro_f1", "answer_rate", "recall/<class>", "format_rate"?}.
  """
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  preds = [_norm(p) for p in predictions]
  gold = [_norm(y) for y in labels]
  names = [_norm(c) for c in (classes if classes is not None else sorted(set(labels)))]
  n = len(gold)
  out: dict[str, float] = {"n": float(n)}
  if n == 0:
    return out
  out["accuracy"] = sum(p == y for p, y in zip(preds, gold)) / n
  out["answer_rate"] = sum(p is not None for p in preds) / n
  f1s = []
  for c, name in zip(names, classes if classes is not None else sorted(set(labels))):
    tp = sum(p == c and y == c for p, y in zip(preds, gold))
    fp = sum(p == c and y != c for p, y in zip(preds, gold))
    fn = sum(p != c and y == c for p, y in zip(preds, gold))
    if tp + fn:
      out[f"recall/{name}"] = tp / (tp + fn)
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  out["macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
  if well_formatted is not None:
    if len(well_formatted) != n:
      raise ValueError(f"{len(well_formatted)} format flags for {n} items")
    out["format_rate"] = sum(bool(w) for w in well_formatted) / n
  return out


def report_markdown(results: dict[str, dict[str, float]], *, step: int) -> str:
  """A short markdown table of split -> metrics (the eval report in the workdir)."""
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
