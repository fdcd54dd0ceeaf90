"""deepintuit_jax.paths on local directories (the code path gs:// URLs take through epath;
no network): writes, appends, staging and removal."""
from __future__ import annotations

import os

from etils import epath

from deepintuit_jax import paths


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

  from deepintuit_jax.trainers import loop
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
