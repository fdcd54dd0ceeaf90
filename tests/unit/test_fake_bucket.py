"""tests/fake_bucket.py: gs:// URLs through epath and Orbax land under the fake's root and
read back; the object-store rules that catch local-only code (no append, no empty
directories) hold; and a write that bypasses epath does not reach the root."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from etils import epath

from tests import fake_bucket


@pytest.fixture
def root(tmp_path, monkeypatch):
  """The fake's root, and an empty current directory to see stray local `gs:` writes."""
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  fake_bucket.install(tmp_path / "root")
  return tmp_path / "root"


def test_write_read_list_glob(root):
  run = epath.Path("gs://bucket/run")
  (run / "a").mkdir(parents=True, exist_ok=True)
  (run / "a" / "x.json").write_text("{}")
  (run / "b.bin").write_bytes(b"\x00\x01")
  assert (root / "bucket/run/a/x.json").read_text() == "{}"
  assert (run / "b.bin").read_bytes() == b"\x00\x01"
  assert (run / "a").is_dir() and (run / "b.bin").is_file() and not (run / "c").exists()
  assert sorted(p.name for p in run.iterdir()) == ["a", "b.bin"]
  assert list(run.glob("*/*.json")) == [epath.Path("gs://bucket/run/a/x.json")]
  assert (run / "b.bin").stat().length == 2
  assert os.listdir() == []


def test_rename_and_rmtree(root):
  run = epath.Path("gs://bucket/run")
  (run / "3" / "f").write_text("step 3")
  (run / "3").rename(run / "3.unreadable")
  assert (run / "3.unreadable" / "f").read_text() == "step 3" and not (run / "3").exists()
  (run / "3.unreadable" / "f").rename(run / "g")
  assert sorted(os.listdir(root / "bucket/run")) == ["g"]
  run.rmtree()
  assert not run.exists() and not (root / "bucket/run").exists()


def test_object_store_rules(root):
  """No append; a directory is only a prefix of objects (mkdir makes nothing, the last
  object's removal removes it); an object appears whole when its writer closes."""
  obj = epath.Path("gs://bucket/log/metrics.jsonl")
  obj.write_text("1\n")
  with pytest.raises(NotImplementedError, match="appended"):
    obj.open("a")
  empty = epath.Path("gs://bucket/empty")
  empty.mkdir(parents=True)
  assert not empty.exists()
  with pytest.raises(FileNotFoundError):
    list(empty.iterdir())
  with (epath.Path("gs://bucket/new/deep/part.txt")).open("w") as f:
    f.write("half")
    assert not (root / "bucket/new").exists()
  assert (root / "bucket/new/deep/part.txt").read_text() == "half"
  obj.unlink()
  assert not epath.Path("gs://bucket/log").exists()


def test_plain_open_misses_the_bucket(root):
  """A gs:// string given to the OS is a relative local path (`gs:/bucket/x`): it lands in
  the current directory, never under the root, which is how a test catches it."""
  os.makedirs("gs://bucket", exist_ok=True)
  with open("gs://bucket/x", "w") as f:
    f.write("lost")
  assert os.listdir() == ["gs:"] and not (root / "bucket/x").exists()
  assert not epath.Path("gs://bucket/x").exists()


def test_orbax_save_restore_and_steps(root):
  """The Orbax calls deepintuit_jax.engine.checkpointing makes: async Composite saves, `keep`
  deletions, the step listing and a restore, on gs://."""
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=True)
  mgr = ocp.CheckpointManager("gs://bucket/ckpt", options=options,
                              item_names=("params", "data"))
  for step in (1, 2, 3):
    args = ocp.args.Composite(params=ocp.args.StandardSave(jax.tree.map(lambda x: x * step,
                                                                        tree)),
                              data=ocp.args.JsonSave({"pos": step}))
    mgr.save(step, args=args, force=True)
  mgr.wait_until_finished()
  mgr.close()

  mgr = ocp.CheckpointManager("gs://bucket/ckpt", options=options,
                              item_names=("params", "data"))
  assert list(mgr.all_steps()) == [2, 3]
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  out = mgr.restore(3, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract),
                                               data=ocp.args.JsonRestore()))
  mgr.close()
  assert out["data"] == {"pos": 3}
  for k in tree:
    assert out["params"][k].dtype == tree[k].dtype
    assert jnp.array_equal(out["params"][k], tree[k] * 3)
  step = root / "bucket/ckpt/3"
  assert (step / "commit_success.txt").exists()  # Orbax took its GCS path (no rename)
  assert (step / "params/manifest.ocdbt").exists()  # TensorStore wrote under the root
  assert not (root / "bucket/ckpt/1").exists()
  assert os.listdir() == []
