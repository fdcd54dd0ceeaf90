"""The reasoning-trace file of the calibration stage: JSONL, append-only, resumable.

One row a line, one row per (item_id, trace_index):

  {"item_id": str, "trace_index": int, "response": str, "answer": str, "rationale": str,
   "label": str | null, "sampling": {"temperature": ..., "max_new_tokens": ..., "seed": ...}}

`answer` / `rationale` are `prompts.split_trace(response)` (a trace missing the tags has an
empty answer and the whole text as rationale). Every row ends with a newline, and a batch of
rows is one write followed by flush + fsync, so a killed writer leaves at most one torn
(newline-less) last line. `TraceWriter` reopens such a file by truncating the torn tail, knows
which keys are done, and refuses to write a key twice: a resumed generation continues where
it stopped with no row lost or duplicated.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from deepintuit_jax.core import interrupts, paths
from deepintuit_jax.data import prompts

Key = tuple[str, int]
REQUIRED = ("item_id", "trace_index", "response", "answer", "rationale", "sampling")


def trace_row(item_id: str, trace_index: int, response: str, *,
              sampling: Mapping[str, Any], label: str | None = None) -> dict[str, Any]:
  """A row of the trace file for one generated response (answer and rationale split off)."""
  answer, rationale = prompts.split_trace(response)
  row = {"item_id": item_id, "trace_index": trace_index, "response": response,
         "answer": answer, "rationale": rationale, "label": label, "sampling": dict(sampling)}
  check_row(row)
  return row


def check_row(row: Any, where: str = "trace row") -> Key:
  """The row's key; raises ValueError naming `where` and the reason for a malformed row."""
  if not isinstance(row, Mapping):
    raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
  missing = [k for k in REQUIRED if k not in row]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  item_id, index = row["item_id"], row["trace_index"]
  if not isinstance(item_id, str) or not item_id:
    raise ValueError(f"{where}: item_id must be a non-empty string, got {item_id!r}")
  if not isinstance(index, int) or isinstance(index, bool) or index < 0:
    raise ValueError(f"{where} (item {item_id!r}): trace_index must be an integer >= 0, "
                     f"got {index!r}")
  for k in ("response", "answer", "rationale"):
    if not isinstance(row[k], str):
      raise ValueError(f"{where} (item {item_id!r}): {k} must be a string")
  if row.get("label") is not None and not isinstance(row["label"], str):
    raise ValueError(f"{where} (item {item_id!r}): label must be a string or null")
  if not isinstance(row["sampling"], Mapping):
    raise ValueError(f"{where} (item {item_id!r}): sampling must be an object")
  return item_id, index


def _scan(path: str, data: bytes | None = None) -> tuple[list[dict], int]:
  """(rows, byte length of the complete lines) of a trace file (`data`: its bytes, when
  already read); the tail after the last newline is a torn row and is not part of either.
  Bad complete lines are errors."""
  if data is None:
    data = paths.as_path(path).read_bytes()
  good = data.rfind(b"\n") + 1  # bytes up to and including the last newline
  rows, seen = [], {}
  for lineno, line in enumerate(data[:good].split(b"\n")[:-1], 1):
    if not line.strip():
      continue
    where = f"{path}: line {lineno}"
    try:
      row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{where} is not valid JSON ({e}); only a torn last line (no newline) "
                       "is repaired automatically") from None
    key = check_row(row, where)
    if key in seen:
      raise ValueError(f"{where}: duplicate trace {key} (first at line {seen[key]})")
    seen[key] = lineno
    rows.append(row)
  return rows, good


def read_traces(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The complete rows of a trace file, in file order (a torn last line is left out)."""
  path = os.fspath(path)
  if not paths.exists(path):
    raise FileNotFoundError(f"trace file {path!r} does not exist")
  return _scan(path)[0]


class TraceWriter:
  """Appends rows to a trace file; resumes an existing one.

      with TraceWriter(path) as w:
        for item_id, indices in w.pending(item_ids, num_traces=4):
          ...generate...
          w.write([trace_row(item_id, k, text, sampling=s) for k, text in ...])

  Opening truncates a torn last line (reported in `repaired_bytes`). Only one writer per
  file (one process): the caller runs it on process 0. On a bucket (no appends) each write
  uploads the whole file again: an object is always a complete prefix of the rows.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.remote = paths.is_remote(self.path)
    if not self.remote:
      self.path = os.path.abspath(self.path)
    paths.makedirs(os.path.dirname(self.path))
    self.repaired_bytes = 0
    rows: list[dict] = []
    self._blob = b""  # a bucket's object as written so far
    if paths.exists(self.path):
      data = paths.as_path(self.path).read_bytes()
      rows, good = _scan(self.path, data)
      size = len(data)
      if self.remote:
        self._blob = data[:good]
        if size > good:
          paths.write_bytes(self.path, self._blob)
      elif size > good:
        with open(self.path, "r+b") as f:
          f.truncate(good)
          f.flush()
          os.fsync(f.fileno())
      self.repaired_bytes = size - good
    self._done: set[Key] = {(r["item_id"], r["trace_index"]) for r in rows}
    self._f = None if self.remote else open(self.path, "ab")

  @property
  def done(self) -> frozenset[Key]:
    """The (item_id, trace_index) keys already in the file."""
    return frozenset(self._done)

  def __len__(self) -> int:
    return len(self._done)

  def pending(self, item_ids: Iterable[str], num_traces: int) -> list[tuple[str, list[int]]]:
    """[(item_id, trace indices still to write)] for `num_traces` traces per item, in the
    order given, leaving out items that are complete."""
    out = []
    for item_id in item_ids:
      todo = [k for k in range(num_traces) if (item_id, k) not in self._done]
      if todo:
        out.append((item_id, todo))
    return out

  def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
    """Appends `rows` as one write, then flush + fsync. Refuses (ValueError, nothing written)
    a malformed row or a key already in the file or twice in `rows`."""
    keys: list[Key] = []
    for i, row in enumerate(rows):
      key = check_row(row, f"row #{i} of the batch for {self.path}")
      if key in self._done or key in keys:
        raise ValueError(f"trace {key} is already in {self.path}" if key in self._done
                         else f"trace {key} appears twice in the batch")
      keys.append(key)
    if not keys:
      return
    blob = b"".join(json.dumps(dict(r), ensure_ascii=False).encode("utf-8") + b"\n"
                    for r in rows)
    if self.remote:
      self._blob += blob
      paths.write_bytes(self.path, self._blob)
    else:
      self._f.write(blob)
      self._f.flush()
      os.fsync(self._f.fileno())
    self._done.update(keys)
    interrupts.kill_point(f"{len(keys)} trace rows written to {self.path}")

  def close(self) -> None:
    if self._f is not None and not self._f.closed:
      self._f.close()

  def __enter__(self) -> "TraceWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
