"""Paths that may be local or `gs://...` URLs (`etils.epath`, the path layer Orbax uses).

Every file a run writes outside its checkpoints (run_config.json, metrics.jsonl, reports,
predictions, the HF export) goes through these helpers, so `--workdir`, `init_from` and
checkpoint directories may be bucket URLs on a pod. Object stores have no append and no
rename-over: `append_line` rewrites the object, `write_text` writes it whole. Libraries that
write only to local files (tensorboardX, the safetensors writer, `save_pretrained`) write
into a local temporary directory that `staged` copies to the destination afterwards.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

from deepintuit_jax.core.errors import ConfigError


def is_remote(path: str | os.PathLike) -> bool:
  """A URL (`gs://`, `s3://`, ...) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path`; local paths are made absolute, URLs kept as they are."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(os.path.expanduser(path)))


def join(path: str | os.PathLike, *parts: str) -> str:
  """`path / parts` as a string (a URL stays a URL)."""
  return os.fspath(as_path(path).joinpath(*parts))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` whole, as UTF-8 (see `write_bytes`)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` whole: atomically (temp file + rename) on a local disk, as one object
  upload on a bucket (an object appears only once complete)."""
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f"{p.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def read_text(path: str | os.PathLike) -> str:
  return as_path(path).read_text()


def append_line(path: str | os.PathLike, line: str) -> None:
  """Appends one line (a newline is added): a real append locally, a rewrite of the whole
  object on a bucket (objects cannot be appended to)."""
  p = as_path(path)
  if not is_remote(p):
    with open(p, "a") as f:
      f.write(line + "\n")
    return
  old = p.read_text() if p.exists() else ""
  p.write_text(old + line + "\n")


def remove(path: str | os.PathLike) -> None:
  """Deletes a file or a directory tree (a symlink itself, not what it points to); missing
  is fine."""
  p = as_path(path)
  if not is_remote(p) and os.path.islink(p):
    os.remove(p)
  elif p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies the directory `src` into `dst`, file by file; either may be local or a URL
  (walked level by level: epath refuses a recursive glob on a bucket)."""
  todo = [(as_path(src), as_path(dst))]
  while todo:
    source, target = todo.pop()
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
      if f.is_dir():
        todo.append((f, target / f.name))
      else:
        (target / f.name).write_bytes(f.read_bytes())


@contextlib.contextmanager
def staged(dst: str | os.PathLike) -> Iterator[str]:
  """A local directory to write `dst` into: `dst` itself when it is local, else a temporary
  directory whose contents are copied to `dst` when the body ends without error."""
  if not is_remote(dst):
    os.makedirs(os.fspath(as_path(dst)), exist_ok=True)
    yield os.fspath(as_path(dst))
    return
  tmp = tempfile.mkdtemp(prefix="deepintuit_stage_")
  try:
    yield tmp
    copy_tree(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj, **dump_kw) -> None:
  """`obj` as JSON (then a newline), written whole (see `write_text`)."""
  write_text(path, json.dumps(obj, **dump_kw) + "\n")


def read_json(path: str | os.PathLike):
  return json.loads(read_text(path))


def exists(path: str | os.PathLike) -> bool:
  return as_path(path).exists()


def isfile(path: str | os.PathLike) -> bool:
  return as_path(path).is_file()


def isdir(path: str | os.PathLike) -> bool:
  return as_path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in a directory (sorted)."""
  return sorted(p.name for p in as_path(path).iterdir())


@contextlib.contextmanager
def fetched(path: str | os.PathLike) -> Iterator[str]:
  """A local directory holding `path`'s files: `path` itself when it is local, else a
  temporary copy of the remote directory (for readers that take local paths only: the
  safetensors reader, transformers' tokenizer), removed when the body ends."""
  if not is_remote(path):
    yield os.fspath(as_path(path))
    return
  tmp = tempfile.mkdtemp(prefix="deepintuit_fetch_")
  try:
    copy_tree(path, tmp)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def parse_named(spec: str, key: str) -> tuple[tuple[str, str], ...]:
  """A config's `name=path,name=path` list (data.eval_files, infer.baselines, ...) ->
  ((name, path), ...); an entry without both halves is a ConfigError naming `key`."""
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, path = part.partition("=")
    if not eq or not name.strip() or not path.strip():
      raise ConfigError(f"{key}: {part!r} is not name=path")
    out.append((name.strip(), path.strip()))
  return tuple(out)
