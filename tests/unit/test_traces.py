"""The trace file: append, resume after a kill or a torn last line, never a duplicate."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deepintuit_jax.data import traces

S = {"temperature": 1.0, "max_new_tokens": 16, "seed": 3}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(item, k, text="<think>why</think><answer>a</answer>"):
  return traces.trace_row(item, k, text, sampling=S, label="a")


def test_row_fields():
  r = _row("x", 0)
  assert (r["answer"], r["rationale"], r["label"]) == ("a", "why", "a")
  r = traces.trace_row("x", 1, "no tags here", sampling=S)
  assert (r["answer"], r["rationale"], r["label"]) == ("", "no tags here", None)
  with pytest.raises(ValueError, match="trace_index must be an integer >= 0"):
    traces.trace_row("x", -1, "t", sampling=S)
  with pytest.raises(ValueError, match="item_id must be a non-empty string"):
    traces.trace_row("", 0, "t", sampling=S)


def test_write_reopen_pending(tmp_path):
  path = tmp_path / "sub" / "traces.jsonl"
  with traces.TraceWriter(path) as w:
    assert w.pending(["a", "b"], 2) == [("a", [0, 1]), ("b", [0, 1])]
    w.write([_row("a", 0), _row("a", 1), _row("b", 1)])
    w.write([])
  with traces.TraceWriter(path) as w:
    assert w.repaired_bytes == 0 and len(w) == 3
    assert w.done == {("a", 0), ("a", 1), ("b", 1)}
    assert w.pending(["a", "b", "c"], 2) == [("b", [0]), ("c", [0, 1])]
    w.write([_row("b", 0)])
  rows = traces.read_traces(path)
  assert [(r["item_id"], r["trace_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 1),
                                                              ("b", 0)]
  assert rows[0]["sampling"] == S and rows[0]["response"].startswith("<think>")


def test_duplicates_refused(tmp_path):
  path = tmp_path / "t.jsonl"
  with traces.TraceWriter(path) as w:
    w.write([_row("a", 0)])
    with pytest.raises(ValueError, match=r"\('a', 0\) is already in"):
      w.write([_row("b", 0), _row("a", 0)])
    with pytest.raises(ValueError, match="appears twice in the batch"):
      w.write([_row("c", 0), _row("c", 0)])
  # Nothing of a refused batch was written.
  assert [(r["item_id"], r["trace_index"]) for r in traces.read_traces(path)] == [("a", 0)]
  with open(path, "a") as f:  # a duplicate that got into the file some other way
    f.write(json.dumps(_row("a", 0)) + "\n")
  with pytest.raises(ValueError, match="line 2: duplicate trace"):
    traces.read_traces(path)


def test_torn_last_line_is_truncated(tmp_path):
  path = tmp_path / "t.jsonl"
  with traces.TraceWriter(path) as w:
    w.write([_row("a", 0), _row("a", 1)])
  good = os.path.getsize(path)
  torn = json.dumps(_row("b", 0)).encode()[:25]
  with open(path, "ab") as f:
    f.write(torn)
  assert len(traces.read_traces(path)) == 2  # a reader ignores the torn tail
  with traces.TraceWriter(path) as w:
    assert w.repaired_bytes == len(torn) and os.path.getsize(path) == good
    assert w.pending(["a", "b"], 2) == [("b", [0, 1])]
    w.write([_row("b", 0), _row("b", 1)])
  keys = [(r["item_id"], r["trace_index"]) for r in traces.read_traces(path)]
  assert keys == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]


def test_bad_middle_line_is_an_error(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(_row("a", 0)) + "\n{not json\n" + json.dumps(_row("a", 1)) + "\n")
  with pytest.raises(ValueError, match="line 2 is not valid JSON"):
    traces.TraceWriter(path)
  path.write_text(json.dumps({"item_id": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"line 1: missing field\(s\)"):
    traces.read_traces(path)


_GENERATOR = """
import sys, time
from deepintuit_jax.data import traces
items = [f"item{i:03d}" for i in range(200)]
with traces.TraceWriter(sys.argv[1]) as w:
  for item, todo in w.pending(items, 4):
    w.write([traces.trace_row(item, k, "<think>r</think><answer>a</answer>" + "x" * 3000,
                              sampling={"seed": k}) for k in todo])
    time.sleep(0.002)
"""


def test_killed_generation_resumes_without_loss_or_duplicates(tmp_path):
  path = str(tmp_path / "t.jsonl")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-c", _GENERATOR, path]
  proc = subprocess.Popen(cmd, env=env)
  deadline = time.time() + 60
  while (not os.path.exists(path) or os.path.getsize(path) < 100_000) and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the generation ended before it could be killed"
  partial = traces.read_traces(path)
  assert 0 < len(partial) < 800
  subprocess.run(cmd, env=env, check=True, timeout=60)
  keys = [(r["item_id"], r["trace_index"]) for r in traces.read_traces(path)]
  assert len(keys) == len(set(keys)) == 800
  assert set(keys) == {(f"item{i:03d}", k) for i in range(200) for k in range(4)}
