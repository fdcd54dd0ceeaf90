"""`save_pretrained`: `Qwen2_5_VL` -> a Hugging Face directory transformers loads.

Writes config.json (original flat layout + text_config), safetensors in HF layout (one
`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json` above `max_shard_size`), generation_config.json, and copies the
tokenizer / processor files of the source directory; `processor=ProcessorSettings(...)` then
writes the pixel and frame settings the model was trained with into the processor files.
Shards are written one at a time, so the host holds at most one shard of tensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import numpy as np

from deepintuit_jax.core import paths
from deepintuit_jax.models import safetensors_io
from deepintuit_jax.models.qwen2_5_vl import hf_io
from deepintuit_jax.models.qwen2_5_vl.hf_load import INDEX, SINGLE

# Files carried from the source directory (tokenizer, chat template, processors).
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json")
_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


@dataclasses.dataclass(frozen=True)
class ProcessorSettings:
  """What the exported processor files must say so that transformers / vLLM preprocess as
  in training: per-frame pixel bounds (Qwen's smart resize; `size.shortest_edge` /
  `size.longest_edge` are what transformers>=4.5x reads, `min_pixels` / `max_pixels` what
  older versions and vLLM read), and for videos the frame bounds and rate of its
  `sample_frames` (`do_sample_frames` only when training sampled by Qwen's fps rule; with
  the release's rule the caller passes the frames it sampled)."""
  min_pixels: int
  max_pixels: int
  max_frames: int
  min_frames: int = 4
  fps: float = 2.0
  sample_frames: bool = False

  @classmethod
  def from_pipeline(cls, options) -> "ProcessorSettings":
    """From the data pipeline's options (`data.pipeline.PipelineOptions`: min_pixels,
    max_pixels, max_frames, min_frames, fps, sampling)."""
    return cls(min_pixels=options.min_pixels, max_pixels=options.max_pixels,
               max_frames=options.max_frames, min_frames=options.min_frames, fps=options.fps,
               sample_frames=options.sampling == "fps")

  def update(self, name: str, cfg: dict) -> dict:
    """`cfg` (the content of processor file `name`) with these settings written in."""
    out = dict(cfg)
    out.update(min_pixels=int(self.min_pixels), max_pixels=int(self.max_pixels))
    size = dict(out.get("size") or {})
    size.pop("min_pixels", None), size.pop("max_pixels", None)
    size.update(shortest_edge=int(self.min_pixels), longest_edge=int(self.max_pixels))
    out["size"] = size
    if name == "video_preprocessor_config.json":
      out.update(max_frames=int(self.max_frames), min_frames=int(self.min_frames),
                 fps=float(self.fps), do_sample_frames=bool(self.sample_frames))
    return out


def write_processor_settings(path: str, settings: ProcessorSettings) -> None:
  """Rewrites the processor files under `path` (those present; the image one is created
  from Qwen's defaults when absent) with `settings`."""
  for name in PROCESSOR_FILES:
    f = os.path.join(path, name)
    if os.path.isfile(f):
      with open(f) as fh:
        cfg = json.load(fh)
    elif name == "preprocessor_config.json":
      cfg = {"image_processor_type": "Qwen2VLImageProcessor",
             "processor_class": "Qwen2_5_VLProcessor", "patch_size": 14,
             "temporal_patch_size": 2, "merge_size": 2,
             "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]}
    else:
      continue  # transformers derives the video processor from the image one
    with open(f, "w") as fh:
      json.dump(settings.update(name, cfg), fh, indent=2, sort_keys=True)
      fh.write("\n")


def parse_size(size: int | str) -> int:
  """5_000_000_000, "5GB" (decimal, as transformers) or "4GiB" -> bytes."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB', '500MB', '4GiB'")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _host_value(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly sharded, possibly multi-host) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
  """Greedy split of keys (in order) into shards of at most `max_bytes` (a bigger tensor
  gets a shard of its own)."""
  shards: list[list[str]] = [[]]
  used = 0
  for key, n in sizes.items():
    if shards[-1] and used + n > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(key)
    used += n
  return shards


def save_pretrained(model, path: str, *, max_shard_size: int | str = "5GB", dtype: Any = None,
                    source_dir: str | None = None,
                    processor: ProcessorSettings | None = None) -> str:
  """Writes `model` as a Hugging Face Qwen2.5-VL directory; returns `path`.

  Args:
    model: a Qwen2_5_VL (sharded or not).
    path: output directory (created; existing weight files there are replaced).
    max_shard_size: bytes or "5GB"-style string; above it, shards + index file.
    dtype: storage dtype of the tensors (default: the parameters' dtype).
    source_dir: where to copy tokenizer / processor / generation files from (default: the
      directory `from_pretrained` loaded the model from, `model.hf_source_dir`).
    processor: the pixel / frame settings of training, written into the processor files
      (default: the source's files are copied unchanged).
  """
  max_bytes = parse_size(max_shard_size)
  params = hf_io.param_items(model)
  np_dtype = np.dtype(dtype if dtype is not None else params[0][1].get_value().dtype)
  if np_dtype.name not in _TORCH_DTYPE:
    raise ValueError(f"save_pretrained: unsupported dtype {np_dtype} (float32/bfloat16/float16)")
  values = {hf_io.hf_key_for_path(p): v.get_value() for p, v in params}
  sizes = {k: safetensors_io.tensor_nbytes(v.shape, np_dtype) for k, v in values.items()}
  shards = plan_shards(sizes, max_bytes)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):  # Stale weights of an earlier save would be mixed in.
      if old.endswith(".safetensors") or old == INDEX:
        os.remove(os.path.join(path, old))
  weight_map = {}
  for i, keys in enumerate(shards):
    name = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for k in keys:  # Every process joins the gathers; only process 0 writes.
      tensors[k] = hf_io.to_hf_tensor(k, _host_value(values[k]).astype(np_dtype))
      weight_map[k] = name
    if writer:
      safetensors_io.save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
  if not writer:
    return path
  if len(shards) > 1:
    with open(os.path.join(path, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
                f, indent=2, sort_keys=True)
      f.write("\n")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(model.config.to_hf_dict(torch_dtype=_TORCH_DTYPE[np_dtype.name]), f, indent=2)
    f.write("\n")
  source = source_dir or getattr(model, "hf_source_dir", None)
  if source and paths.join(source) != os.path.abspath(path):
    for name in CARRIED_FILES:  # the source may be a bucket's export (a chain on gs://)
      if paths.isfile(os.path.join(source, name)):
        with open(os.path.join(path, name), "wb") as f:
          f.write(paths.as_path(os.path.join(source, name)).read_bytes())
  if processor is not None:
    write_processor_settings(path, processor)
  gen = os.path.join(path, "generation_config.json")
  if not os.path.isfile(gen):
    cfg = model.config
    eos = [t for t in (cfg.eos_token_id, cfg.bos_token_id) if t is not None]
    with open(gen, "w") as f:
      json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
                 "pad_token_id": cfg.bos_token_id}, f, indent=2)
      f.write("\n")
  return path

