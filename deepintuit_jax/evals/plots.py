"""Confusion matrices and reliability diagrams as figures, PNG files and TensorBoard images.

matplotlib is imported inside the functions (the package imports without it) and only its
object API is used (`Figure` + the Agg canvas): no pyplot, no global backend state, so it
works headless and from threads. Inputs are the entries of `metrics.classification_metrics`:
"classes", "confusion" ([C][C + 1], rows true, last column unparsed/invalid) and
"reliability" ({"edges", "count", "accuracy", "confidence"}).
"""
from __future__ import annotations

import io
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from deepintuit_jax.core import paths
from deepintuit_jax.evals import metrics as metrics_lib


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], *,
                     title: str = ""):
  """A [C, C + 1] confusion matrix as a heat map with counts (rows normalised for colour)."""
  cm = np.asarray(confusion, np.int64)
  c = len(classes)
  if cm.shape != (c, c + 1):
    raise ValueError(f"confusion matrix of shape {cm.shape} for {c} classes; expected "
                     f"({c}, {c + 1})")
  side = 1.2 + 0.55 * (c + 1)
  fig = _figure(side + 1.5, side)
  ax = fig.add_subplot(1, 1, 1)
  rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
  im = ax.imshow(cm / rows, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
  cols = list(classes) + [metrics_lib.UNPARSED]
  ax.set_xticks(range(c + 1), cols, rotation=45, ha="right")
  ax.set_yticks(range(c), list(classes))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(c):
    for j in range(c + 1):
      share = cm[i, j] / rows[i, 0]
      ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
              color="white" if share > 0.5 else "black", fontsize=8)
  ax.set_title(title or "confusion matrix", fontsize=9)
  fig.tight_layout()
  return fig


def reliability_figure(rel: Mapping[str, Any], *, title: str = ""):
  """Accuracy per confidence bin (bars) against the diagonal, with the bin counts below."""
  edges = np.asarray(rel["edges"], np.float64)
  count = np.asarray(rel["count"], np.int64)
  acc = np.array([np.nan if a is None else a for a in rel["accuracy"]], np.float64)
  conf = np.array([np.nan if a is None else a for a in rel["confidence"]], np.float64)
  width = np.diff(edges)
  fig = _figure(4.5, 5.0)
  top = fig.add_axes((0.15, 0.38, 0.8, 0.54))
  bottom = fig.add_axes((0.15, 0.1, 0.8, 0.18), sharex=top)
  ok = count > 0
  top.bar(edges[:-1][ok], acc[ok], width=width[ok], align="edge", edgecolor="black",
          color="tab:blue", label="accuracy")
  top.bar(edges[:-1][ok], (conf - acc)[ok], bottom=acc[ok], width=width[ok], align="edge",
          color="tab:red", alpha=0.3, label="gap to confidence")
  top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
  top.set_xlim(0, 1)
  top.set_ylim(0, 1)
  top.set_ylabel("accuracy")
  top.legend(loc="upper left", fontsize=7)
  ece = rel.get("ece")
  label = title or "reliability"
  if ece is not None and np.isfinite(ece):
    label += f" (ECE {ece:.3f})"
  top.set_title(label, fontsize=9)
  bottom.bar(edges[:-1], count, width=width, align="edge", color="gray", edgecolor="black")
  bottom.set_xlabel("confidence (largest score)")
  bottom.set_ylabel("items")
  return fig


def save_png(fig, path: str) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  paths.write_bytes(path, buf.getvalue())
  return path


def figure_to_array(fig) -> np.ndarray:
  """[H, W, 3] uint8 RGB of a figure (for TensorBoard's add_image)."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def safe_name(name: str) -> str:
  """A file-name-safe version of a model or split name."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def split_figures(model: str, split: str, m: Mapping[str, Any]) -> dict[str, Any]:
  """{"confusion": Figure, "reliability": Figure?} of one model's metrics on one split."""
  out = {}
  if not m.get("n"):
    return out  # an empty split has nothing to draw
  if m.get("classes") and m.get("confusion") is not None:
    out["confusion"] = confusion_figure(m["confusion"], m["classes"],
                                        title=f"{model} / {split} (n={int(m.get('n', 0))})")
  if m.get("reliability") is not None:
    out["reliability"] = reliability_figure(m["reliability"], title=f"{model} / {split}")
  return out


def write_plots(out_dir: str, results: Mapping[str, Mapping[str, Mapping[str, Any]]]
                ) -> dict[str, dict[str, dict[str, str]]]:
  """PNG files `<out_dir>/<kind>_<model>_<split>.png` for {model: {split: metrics}}.

  Returns {model: {split: {kind: path}}} (kind = "confusion" / "reliability")."""
  paths: dict[str, dict[str, dict[str, str]]] = {}
  for model, splits in results.items():
    for split, m in splits.items():
      for kind, fig in split_figures(model, split, m).items():
        path = os.path.join(out_dir, f"{kind}_{safe_name(model)}_{safe_name(split)}.png")
        paths.setdefault(model, {}).setdefault(split, {})[kind] = save_png(fig, path)
  return paths


def add_to_tensorboard(writer, results: Mapping[str, Mapping[str, Mapping[str, Any]]], *,
                       step: int, prefix: str = "eval") -> int:
  """Writes each figure as an image `<prefix>/<model>/<split>/<kind>` to a tensorboardX
  `SummaryWriter` (or anything with `add_image(tag, array, step, dataformats="HWC")`).
  Returns the number of images written."""
  k = 0
  for model, splits in results.items():
    for split, m in splits.items():
      for kind, fig in split_figures(model, split, m).items():
        writer.add_image(f"{prefix}/{model}/{split}/{kind}", figure_to_array(fig), int(step),
                         dataformats="HWC")
        k += 1
  if k and hasattr(writer, "flush"):
    writer.flush()
  return k


def curves_figure(runs: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                  keys: Sequence[str], *, title: str = "", window: int = 4):
  """One panel per metric key; per run its (steps, values) as light points and a trailing
  mean over `window` points as a line (runs in the order given; a run without a key is left
  out of that panel)."""
  fig = _figure(4.2 * len(keys), 3.4)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(1, len(keys), i + 1)
    for j, (name, series) in enumerate(runs.items()):
      if key not in series:
        continue
      x, y = (np.asarray(v, np.float64) for v in series[key])
      colour = f"C{j}"
      ax.plot(x, y, "o", color=colour, alpha=0.25, markersize=3)
      smooth = np.array([y[max(0, k - window + 1):k + 1].mean() for k in range(len(y))])
      ax.plot(x, smooth, "-", color=colour, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_title(key, fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig
