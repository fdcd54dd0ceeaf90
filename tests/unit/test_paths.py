"""deepintuit_jax.core.paths on local directories (the code path gs:// URLs take through epath;
no network): writes, appends, staging and removal."""
from __future__ import annotations

import json
import os

import pytest
from etils import epath

from deepintuit_jax.core import paths


def test_remote_and_local_paths():
  assert paths.is_remote("gs://bucket/run") and not paths.is_remote("/tmp/run")
  assert paths.join("gs://bucket/run", "metrics.jsonl") == "gs://bucket/run/metrics.jsonl"
  assert paths.join("rel", "a") == os.path.join(os.getcwd(), "rel", "a")


def test_write_append_read(tmp_path):
  target = tmp_path / "sub" / "f.txt"
  paths.write_text(target, "one\n")
  paths.append_line(target, "two")
  assert target.read_text() == "one\ntwo\n"
  assert paths.read_text(epath.Path(target)) == "one\ntwo\n"
  assert os.listdir(tmp_path / "sub") == ["f.txt"]  # no temp file left


def test_staged_local_is_the_destination(tmp_path):
  with paths.staged(tmp_path / "out") as local:
    assert local == str(tmp_path / "out")
    open(os.path.join(local, "a.json"), "w").write("{}")
  assert (tmp_path / "out" / "a.json").read_text() == "{}"


def test_copy_tree_and_remove(tmp_path):
  src = tmp_path / "src"
  (src / "d").mkdir(parents=True)
  (src / "x.bin").write_bytes(b"\x00\x01")
  (src / "d" / "y.txt").write_text("y")
  paths.copy_tree(src, epath.Path(tmp_path / "dst"))
  assert (tmp_path / "dst" / "x.bin").read_bytes() == b"\x00\x01"
  assert (tmp_path / "dst" / "d" / "y.txt").read_text() == "y"
  paths.remove(tmp_path / "dst")
  paths.remove(tmp_path / "missing")
  paths.remove(src / "x.bin")
  assert not (tmp_path / "dst").exists() and not (src / "x.bin").exists()


def test_staged_remote_writes_locally_then_copies(tmp_path, monkeypatch):
  """The bucket code path, with a local directory standing in for the bucket."""
  dst = tmp_path / "bucket" / "hf"
  bucket = str(tmp_path / "bucket")
  monkeypatch.setattr(paths, "is_remote", lambda p: os.fspath(p).startswith(bucket))
  with paths.staged(dst) as local:
    assert not local.startswith(str(tmp_path))
    assert not dst.exists()  # nothing reaches the destination before the body ends
    os.makedirs(os.path.join(local, "sub"))
    open(os.path.join(local, "sub", "w.safetensors"), "wb").write(b"abc")
  assert (dst / "sub" / "w.safetensors").read_bytes() == b"abc"
  assert not os.path.exists(local)
  paths.append_line(tmp_path / "bucket" / "m.jsonl", "1")  # the rewrite-the-object path
  paths.append_line(tmp_path / "bucket" / "m.jsonl", "2")
  assert (tmp_path / "bucket" / "m.jsonl").read_text() == "1\n2\n"


def test_metrics_writer_on_a_bucket_path(tmp_path, monkeypatch):
  """MetricsWriter's bucket path (rows by object rewrite, TensorBoard staged locally and
  copied at close), with a local directory standing in for the bucket; a restart drops the
  rows past the restored step through the same helpers."""
  import json

  from deepintuit_jax.engine import loop
  bucket = str(tmp_path / "bucket")
  monkeypatch.setattr(paths, "is_remote", lambda p: os.fspath(p).startswith(bucket))
  w = loop.MetricsWriter(os.path.join(bucket, "run"))
  for step in (1, 2, 3):
    w.write(step, {"loss": float(step)}, prefix="train/")
  assert not os.path.exists(os.path.join(bucket, "run", "tb"))  # events still local
  w.close()
  assert os.listdir(os.path.join(bucket, "run", "tb"))
  w = loop.MetricsWriter(os.path.join(bucket, "run"), tensorboard=False, resume_step=2)
  with open(os.path.join(bucket, "run", "metrics.jsonl")) as f:
    assert [json.loads(line) for line in f] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The offline fake gs:// bucket (tests/fake_bucket.py) and an empty working directory."""
  from tests import fake_bucket
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  fake_bucket.install(tmp_path / "root")
  yield tmp_path / "root" / "b"
  assert os.listdir(tmp_path / "cwd") == []  # nothing bypassed epath


def test_helpers_and_fetched_on_a_bucket(bucket):
  paths.write_json("gs://b/run/hf/config.json", {"a": 1}, indent=1)
  paths.write_bytes("gs://b/run/hf/sub/w.safetensors", b"abc")
  assert paths.isfile("gs://b/run/hf/config.json") and paths.isdir("gs://b/run/hf/sub")
  assert paths.read_json("gs://b/run/hf/config.json") == {"a": 1}
  assert paths.listdir("gs://b/run/hf") == ["config.json", "sub"]
  assert (bucket / "run" / "hf" / "config.json").read_text() == '{\n "a": 1\n}\n'
  with paths.fetched("gs://b/run/hf") as local:
    assert not local.startswith("gs:") and os.path.isabs(local)
    assert open(os.path.join(local, "sub", "w.safetensors"), "rb").read() == b"abc"
    assert json.load(open(os.path.join(local, "config.json"))) == {"a": 1}
  assert not os.path.exists(local)  # the copy is gone


def test_trace_writer_on_a_bucket_rewrites_the_object_and_repairs_a_torn_row(bucket):
  """No appends on a bucket: each batch uploads the whole file; a torn tail is cut on reopen."""
  from deepintuit_jax.data import traces
  path = "gs://b/run/traces.jsonl"
  sampling = {"temperature": 0.7}
  with traces.TraceWriter(path) as w:
    w.write([traces.trace_row("a", 0, "<answer>x</answer>", sampling=sampling)])
    w.write([traces.trace_row("b", 0, "<answer>y</answer>", sampling=sampling)])
  local = bucket / "run" / "traces.jsonl"
  assert [r["item_id"] for r in traces.read_traces(path)] == ["a", "b"]
  whole = local.read_bytes()
  paths.write_bytes(path, whole + b'{"item_id": "c", "tra')  # a torn row, as after a kill
  with traces.TraceWriter(path) as w:
    assert w.repaired_bytes == 21 and w.done == {("a", 0), ("b", 0)}
    assert local.read_bytes() == whole
    w.write([traces.trace_row("c", 0, "<answer>z</answer>", sampling=sampling)])
  assert [r["item_id"] for r in traces.read_traces(path)] == ["a", "b", "c"]
