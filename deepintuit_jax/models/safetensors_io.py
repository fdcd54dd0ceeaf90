"""A small, dependency-light reader/writer of the safetensors format.

Why not `safetensors.safe_open(framework="numpy")`: NumPy has no bfloat16, so it cannot read
the bf16 tensors of the released checkpoints. Here tensors are lazy NumPy views of a
read-only memory map (bfloat16 through `ml_dtypes`), so a caller that needs only a slice
(one device's shard) reads only those pages. The format: 8 bytes little-endian header
length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{str: str}}` (offsets relative to the end of the header), then the data.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A malformed or unreadable safetensors file (the message names the file)."""


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
  """(tensor entries by name, __metadata__, byte offset of the data) of a safetensors file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: safetensors file not found")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise SafetensorsError(f"{path}: not a safetensors file (header length {n} invalid)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
  meta = header.pop("__metadata__", None) or {}
  data_start, data_len = 8 + n, size - 8 - n
  for name, e in header.items():
    try:
      dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(
          f"{path}: tensor {name!r} has a malformed or unsupported header entry {e}") from None
    if not 0 <= begin <= end <= data_len or end - begin != dtype.itemsize * int(np.prod(shape)):
      raise SafetensorsError(
          f"{path}: tensor {name!r} has byte range [{begin}, {end}) inconsistent with dtype "
          f"{e['dtype']} shape {list(shape)} or the file size (truncated file?)")
  return header, meta, data_start


class SafetensorsFile:
  """Lazy read-only access to one file: `names()`, `shape(name)`, `dtype(name)`, `get(name)`
  (a NumPy view of the memory map; index it to read a slice, `np.array` it to copy)."""

  def __init__(self, path: str):
    self.path = path
    self.entries, self.metadata, self._start = read_header(path)
    self._mm = None

  def names(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self.entries[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    if name not in self.entries:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    e = self.entries[name]
    begin, end = e["data_offsets"]
    raw = self._mm[self._start + begin:self._start + end]
    return raw.view(DTYPES[e["dtype"]]).reshape(tuple(e["shape"]))


def tensor_nbytes(shape: Iterable[int], dtype) -> int:
  return int(np.prod(tuple(shape))) * np.dtype(dtype).itemsize


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (any of DTYPES, bfloat16 included) as a safetensors file, in key order."""
  header: dict[str, dict] = {}
  offset = 0
  arrays = {}
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in NAMES:
      raise TypeError(f"{path}: tensor {name!r} has unsupported dtype {a.dtype}")
    header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays[name] = a
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The data starts 8-byte aligned, as the reference writer does.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in header:
      if name != "__metadata__":
        f.write(arrays[name].tobytes())
  os.replace(tmp, path)
