"""A fake Google Cloud Storage bucket on a local directory, for tests that run offline.

`install(root)` makes every `gs://bucket/a/b` the process opens land in `<root>/bucket/a/b`,
through the code path real bucket URLs take: `etils.epath` -> fsspec (here a filesystem
registered for "gs"/"gcs" in place of gcsfs) and Orbax -> TensorStore (Orbax's GCS kvstore
spec becomes a `file` spec under `root`). A write that bypasses that path (a plain `open`,
`os.makedirs` of a gs:// string) does not reach `root`: it makes a `gs:` folder in the
current directory, which is what a test looks for to catch it.

Where it is cheap, the fake behaves like an object store, so that code which works only on
a local disk fails here too:
* no append or in-place update (`open(path, "a")`, "r+" raise);
* an object appears whole when its writer closes, parents and all (there are no
  directories to create first);
* a directory exists only while an object is under it: `mkdir` creates nothing, removing
  the last object removes the directory, and an empty directory is neither listed nor
  found;
* a rename is a copy then a delete (not atomic), as in gcsfs.

Run a stage on the fake bucket, in one process:

    python -m tests.fake_bucket --root=DIR -- --config=configs/sft.py:pulse --workdir=gs://b/run
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import sys
import tempfile

import fsspec
from fsspec.spec import AbstractFileSystem


class _Upload(io.BufferedWriter):
  """A write to a staging file, moved to the object's place on close (an upload)."""

  def __init__(self, staging: str, final: str):
    super().__init__(io.FileIO(staging, "w"))
    self._staging, self._final = staging, final

  def close(self) -> None:
    if self.closed:
      return
    super().close()
    os.makedirs(os.path.dirname(self._final), exist_ok=True)
    os.replace(self._staging, self._final)


class FakeGCSFileSystem(AbstractFileSystem):
  """fsspec filesystem for `gs://` on `local_root` (set by `install`). Names are in the
  protocol-less `bucket/a/b` form gcsfs uses, which epath's glob prefixes with `gs://`."""
  protocol = ("gs", "gcs")
  cachable = False  # the root is a class setting; no instance outlives a re-install
  local_root: str | None = None

  def __init__(self, *args, **storage_options):  # e.g. finalize_on_close=True (epath)
    super().__init__(*args, **storage_options)
    if self.local_root is None:
      raise RuntimeError("tests.fake_bucket: install(root) first")

  def _local(self, path: str) -> str:
    key = self._strip_protocol(path)
    local = os.path.normpath(os.path.join(self.local_root, key))
    if os.path.commonpath([local, self.local_root]) != self.local_root:
      raise ValueError(f"{path!r} is outside the fake bucket root")
    return local

  @staticmethod
  def _has_object(local_dir: str) -> bool:
    return any(files for _, _, files in os.walk(local_dir))

  def _prune(self, local_dir: str) -> None:
    """Removes directories left empty, up to the bucket (no object, no directory)."""
    while (os.path.dirname(local_dir) != self.local_root and os.path.isdir(local_dir)
           and not os.listdir(local_dir)):
      os.rmdir(local_dir)
      local_dir = os.path.dirname(local_dir)

  def info(self, path, **kwargs) -> dict:
    key, local = self._strip_protocol(path), self._local(path)
    if os.path.isfile(local):
      st = os.stat(local)
      return {"name": key, "size": st.st_size, "type": "file", "mtime": st.st_mtime}
    if (key and "/" not in key) or (os.path.isdir(local) and self._has_object(local)):
      return {"name": key, "size": 0, "type": "directory"}  # a bucket always exists
    raise FileNotFoundError(errno.ENOENT, "no such object or prefix", path)

  def ls(self, path, detail=True, **kwargs) -> list:
    top = self.info(path)
    if top["type"] == "file":
      entries = [top]
    else:
      local, entries = self._local(path), []
      for name in sorted(os.listdir(local)) if os.path.isdir(local) else []:
        try:
          entries.append(self.info(f"{top['name']}/{name}"))
        except FileNotFoundError:  # an empty directory: nothing there on a bucket
          pass
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
            **kwargs):
    local = self._local(path)
    if mode == "rb":
      return open(local, "rb")
    if mode == "wb":
      staging = os.path.join(self.local_root, ".uploads")
      os.makedirs(staging, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=staging)
      os.close(fd)
      return _Upload(tmp, local)
    raise NotImplementedError(
        f"open('gs://{path}', {mode!r}): a GCS object is written whole, it cannot be appended "
        "to or updated in place")

  def mkdir(self, path, create_parents=True, **kwargs) -> None:
    """Creates nothing (GCS has no directories), except a bucket."""
    key = self._strip_protocol(path)
    if key and "/" not in key:
      os.makedirs(self._local(path), exist_ok=True)

  def makedirs(self, path, exist_ok=False) -> None:
    if not exist_ok and self.exists(path):
      raise FileExistsError(errno.EEXIST, "exists", path)
    self.mkdir(path)

  def rmdir(self, path) -> None:
    local = self._local(path)
    if os.path.isdir(local) and self._has_object(local):
      raise OSError(errno.ENOTEMPTY, "not empty", path)
    if os.path.isdir(local) and "/" in self._strip_protocol(path):
      shutil.rmtree(local)
      self._prune(os.path.dirname(local))

  def rm(self, path, recursive=False, maxdepth=None) -> None:
    for p in path if isinstance(path, list) else [path]:
      kind, local = self.info(p)["type"], self._local(p)
      if kind == "file":
        os.remove(local)
      elif not recursive:
        raise IsADirectoryError(errno.EISDIR, "a prefix, not an object", p)
      else:
        shutil.rmtree(local)
      self._prune(os.path.dirname(local))

  def rm_file(self, path) -> None:
    self.rm(path)

  def cp_file(self, path1, path2, **kwargs) -> None:
    if self.info(path1)["type"] != "file":
      return  # prefixes are not objects: copying the objects under one copies it
    with self.open(path1, "rb") as src, self.open(path2, "wb") as dst:
      shutil.copyfileobj(src, dst)


def _kvstore_for_gcs(ckpt_path: str) -> dict:
  """Orbax's `gcs_utils.get_kvstore_for_gcs` on the fake: the TensorStore `file` driver on
  the object's local place."""
  return {"driver": "file", "path": FakeGCSFileSystem()._local(ckpt_path)}


def _no_gcs_client(*args, **kwargs):
  raise NotImplementedError("tests.fake_bucket: no GCS client (an offline fake bucket)")


def install(root: str | os.PathLike) -> None:
  """Routes every `gs://` URL of this process to `root` (process-wide; a later call moves
  it to another root)."""
  FakeGCSFileSystem.local_root = os.path.realpath(os.fspath(root))
  os.makedirs(FakeGCSFileSystem.local_root, exist_ok=True)
  for protocol in FakeGCSFileSystem.protocol:
    fsspec.register_implementation(protocol, FakeGCSFileSystem, clobber=True)
  from etils.epath import backend  # caches the filesystem it made for gs:// (lru_cache)
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()

  from orbax.checkpoint._src.path import gcs_utils
  gcs_utils.get_kvstore_for_gcs = _kvstore_for_gcs
  # Step listing and rmtree ask the bucket whether it has a hierarchical namespace (a GCS
  # API call); the fake is a plain bucket, and no other GCS API is reachable.
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
  gcs_utils.get_bucket = _no_gcs_client


def _main(argv: list[str]) -> None:
  """`--root=DIR -- <deepintuit_jax.main arguments>`: that stage run, on the fake bucket."""
  if "--" not in argv or not any(a.startswith("--root=") for a in argv[:argv.index("--")]):
    sys.exit("usage: python -m tests.fake_bucket --root=DIR -- <deepintuit_jax.main args>")
  split = argv.index("--")
  install(next(a for a in argv[:split] if a.startswith("--root="))[len("--root="):])
  from absl import app
  from deepintuit_jax import main
  sys.argv = ["deepintuit_jax.main", *argv[split + 1:]]
  app.run(main.main, flags_parser=main._parse_flags)  # pylint: disable=protected-access


if __name__ == "__main__":
  _main(sys.argv[1:])
