"""Bad-sample errors and the skip ledger shared by every data stage.

Every reader raises `BadSample` (never a bare exception) for input it cannot use, naming the
item, the file and the reason. With `on_bad_sample="skip"` the pipeline catches it, counts it
by `kind` in a `SkipLedger`, and reports the counts at the end of each epoch (and in the
metrics); with `"error"` it propagates and stops the run.
"""
from __future__ import annotations

import collections
import dataclasses

from deepintuit_jax.core.errors import shorten

ON_BAD_SAMPLE = ("error", "skip")

# Reason kinds (keys of the skip summary). Readers may add others; keep them short and stable.
MISSING_FILE = "missing_file"
CORRUPT_VIDEO = "corrupt_video"
NO_FRAMES = "no_frames"
BAD_ZIP = "bad_zip"
BAD_RECORD = "bad_record"
UNKNOWN_LABEL = "unknown_label"
TOO_LONG = "too_long"


class BadSample(ValueError):
  """An input item that cannot be used. `str(e)` names the item, path and reason."""

  def __init__(self, reason: str, *, kind: str, item_id: str | None = None,
               path: str | None = None):
    self.reason, self.kind, self.item_id, self.path = reason, kind, item_id, path
    where = ", ".join(x for x in (f"item {item_id!r}" if item_id is not None else "",
                                  f"file {path!r}" if path else "") if x)
    super().__init__(f"bad sample ({kind}){' ' + where if where else ''}: {reason}")

  def __str__(self) -> str:
    return shorten(super().__str__())  # a huge item id or path echoed stays readable

  def with_item(self, item_id: str | None = None, path: str | None = None) -> "BadSample":
    """The same error with the item id / path filled in where they were unknown."""
    return BadSample(self.reason, kind=self.kind, item_id=self.item_id or item_id,
                     path=self.path or path)


def check_on_bad_sample(mode: str) -> str:
  if mode not in ON_BAD_SAMPLE:
    raise ValueError(f"on_bad_sample={mode!r}: must be one of {ON_BAD_SAMPLE}")
  return mode


@dataclasses.dataclass
class SkipLedger:
  """Counts of skipped items by reason kind, with a few examples of each for the report."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  max_examples: int = 3

  def add(self, err: BadSample) -> None:
    self.counts[err.kind] += 1
    ex = self.examples.setdefault(err.kind, [])
    if len(ex) < self.max_examples:
      ex.append(str(err))

  def merge(self, other: "SkipLedger") -> None:
    for kind, n in other.counts.items():
      self.counts[kind] += n
      ex = self.examples.setdefault(kind, [])
      ex.extend(other.examples.get(kind, [])[: max(0, self.max_examples - len(ex))])

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def as_metrics(self, prefix: str = "skipped") -> dict[str, int]:
    """{"skipped/total": n, "skipped/<kind>": n, ...} for metrics.jsonl."""
    out = {f"{prefix}/total": self.total}
    out.update({f"{prefix}/{k}": v for k, v in sorted(self.counts.items())})
    return out

  def summary(self) -> str:
    if not self.total:
      return "no samples skipped"
    lines = [f"skipped {self.total} sample(s):"]
    for kind, n in sorted(self.counts.items()):
      lines.append(f"  {kind}: {n}" + "".join(f"\n    e.g. {e}" for e in self.examples.get(kind, [])))
    return "\n".join(lines)
