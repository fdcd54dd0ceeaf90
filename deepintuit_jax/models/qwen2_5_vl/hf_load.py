"""`from_pretrained`: a Hugging Face Qwen2.5-VL directory -> `Qwen2_5_VL`, optionally sharded.

The model is built abstractly (`nnx.eval_shape`), then every parameter is filled straight
from the safetensors memory map: with a mesh, `jax.make_array_from_callback` reads only the
slice each device holds, so no full copy of a tensor ever sits on one device. Only
safetensors are read; pickled `*.bin` / `*.pt` weights are refused.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.core.errors import InputError, InputNotFound, UserError
from deepintuit_jax.models import safetensors_io
from deepintuit_jax.models.qwen2_5_vl import hf_io
from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, RuntimeOptions

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _pickle_message(where: str, pickles: list[str]) -> str:
  return (f"{where} holds only pickled weights ({', '.join(pickles[:4])}); they are not loaded "
          "because unpickling can run arbitrary code (unsafe). Convert them to safetensors "
          "(e.g. transformers: model.save_pretrained(dir, safe_serialization=True)).")


def check_model_dir(path: str, *, key: str = "model.checkpoint",
                    tokenizer: bool = True) -> None:
  """Raises a `UserError` naming `key` unless `path` is a local Hugging Face model
  directory: config.json, safetensors weights (pickled-only weights are refused; every shard
  present, its header consistent with its size) and, with `tokenizer`, tokenizer files.
  Checked before transformers sees the path (it would read a missing directory as a Hub
  repo id)."""
  where = f"{key}={path!r}"
  if not os.path.exists(path):
    raise InputNotFound(f"{where}: no such directory (a local Hugging Face model directory "
                        "with config.json and *.safetensors is expected; nothing is "
                        "downloaded from the Hub)")
  if not os.path.isdir(path):
    raise InputNotFound(f"{where} is a file, not a model directory")
  listing = sorted(os.listdir(path))
  has_weights = any(f.endswith(".safetensors") or f == INDEX for f in listing)
  pickles = [f for f in listing if f.endswith(PICKLE_SUFFIXES)]
  if not has_weights and pickles:
    raise InputError(_pickle_message(where, pickles)
                     + ("" if "config.json" in listing else " It has no config.json either."))
  if "config.json" not in listing:
    raise InputNotFound(f"{where}: no config.json (not a Hugging Face model directory)")
  if not has_weights:
    raise InputNotFound(f"{where}: no {SINGLE}, {INDEX} or *.safetensors weights")
  if tokenizer and not any(f in listing for f in TOKENIZER_FILES):
    raise InputNotFound(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy "
                        "them from the base model's directory")
  try:  # headers only (cheap): a truncated or missing shard is named here, not loaded half
    for name in weight_files(path)[0]:
      safetensors_io.read_header(os.path.join(path, name))
  except UserError:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise InputError(f"{where}: unusable weights: {e}") from None


def weight_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """(safetensors file names, the index's weight_map or None) of a model directory."""
  index_path = os.path.join(path, INDEX)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      try:
        index = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{index_path}: corrupt index JSON ({e})") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
      raise ValueError(f"{index_path}: corrupt index: needs a 'weight_map' object mapping "
                       "tensor names to shard file names")
    files = sorted(set(wmap.values()))
    for name in files:
      if os.path.basename(name) != name:
        raise ValueError(f"{index_path}: shard name {name!r} is not a plain file name")
      if not os.path.isfile(os.path.join(path, name)):
        keys = sorted(k for k, v in wmap.items() if v == name)
        raise FileNotFoundError(
            f"{index_path} maps {len(keys)} tensor(s) (e.g. key {keys[0]!r}) to shard "
            f"{name!r}, but {os.path.join(path, name)} does not exist (missing shard file)")
    return files, wmap
  if os.path.isfile(os.path.join(path, SINGLE)):
    return [SINGLE], None
  listing = sorted(os.listdir(path))
  shards = [f for f in listing if f.endswith(".safetensors")]
  if shards:
    return shards, None
  pickles = [f for f in listing if f.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise InputError(_pickle_message(f"{path}:", pickles))
  raise InputNotFound(f"{path}: no {SINGLE}, {INDEX} or *.safetensors weights")


def _open_tensors(path: str) -> dict[str, tuple[safetensors_io.SafetensorsFile, str]]:
  """Flat HF key -> (open file, name in the file), checked against the index."""
  files, wmap = weight_files(path)
  table: dict[str, tuple[safetensors_io.SafetensorsFile, str]] = {}
  for name in files:
    f = safetensors_io.SafetensorsFile(os.path.join(path, name))
    for raw in f.names():
      key = hf_io.normalize_hf_key(raw)
      if key in table:
        raise ValueError(f"{f.path}: tensor {raw!r} is also in {table[key][0].path} "
                         "(duplicate key)")
      table[key] = (f, raw)
  if wmap is not None:
    for raw, name in wmap.items():
      got = table.get(hf_io.normalize_hf_key(raw))
      if got is None or os.path.basename(got[0].path) != name:
        raise ValueError(f"{os.path.join(path, INDEX)}: key {raw!r} is mapped to {name!r}, "
                         "but that shard does not hold it")
  return table


def resolve_options(dtype: Any, param_dtype: Any, opts: RuntimeOptions | None) -> RuntimeOptions:
  """opts when given (it fixes both dtypes; then `dtype` is ignored), else
  RuntimeOptions(dtype, param_dtype or dtype)."""
  if opts is None:
    return RuntimeOptions(dtype=dtype, param_dtype=param_dtype or dtype)
  if param_dtype is not None and jnp.dtype(param_dtype) != jnp.dtype(opts.param_dtype):
    raise ValueError(f"param_dtype {param_dtype} conflicts with opts.param_dtype "
                     f"{opts.param_dtype}")
  return opts


def from_pretrained(path: str, dtype: Any = jnp.bfloat16, mesh: Mesh | None = None, *,
                    param_dtype: Any = None, opts: RuntimeOptions | None = None,
                    rules=sharding_lib.DEFAULT_RULES, rope_convention: str | None = None):
  """Loads a Hugging Face Qwen2.5-VL directory (config.json + safetensors) into `Qwen2_5_VL`.

  Args:
    path: directory with config.json and model.safetensors, or shards with
      model.safetensors.index.json (flat or transformers>=5 key layout).
    dtype: compute dtype (RuntimeOptions.dtype).
    mesh: place each parameter directly into NamedSharding(mesh, rules(logical axes));
      None = default device.
    param_dtype: storage dtype of the parameters; default = `dtype` (bf16 inference keeps
      a 7B model in 16 GB). Pass jnp.float32 for fp32 master weights when training.
    opts: full RuntimeOptions (remat, attention kernel); overrides dtype / param_dtype.
    rules: logical-axis -> mesh-axis rules.
    rope_convention: the rope rule of the model's config (`rope.CONVENTIONS`); None = the
      one config.json records ("qwen" when it records none). A `ConfigError` when
      config.json records another one.
  Returns:
    the model; `model.hf_source_dir` remembers `path` for save_pretrained's file copies.
  Raises:
    FileNotFoundError / ValueError / KeyError naming the file and tensor key on a missing
    shard, missing / unexpected key, wrong shape, corrupt index, unsupported architecture,
    or pickled-only weights.
  """
  if not os.path.isdir(path):
    raise InputNotFound(f"{path}: not a directory")
  config = Qwen2_5_VLConfig.from_pretrained_dir(path)
  if rope_convention is not None:
    Qwen2_5_VLConfig.check_rope_convention(
        rope_convention, Qwen2_5_VLConfig.recorded_rope_convention(path), path)
    config = config.replace(rope_convention=rope_convention)
  opts = resolve_options(dtype, param_dtype, opts)
  table = _open_tensors(path)
  model = hf_io.abstract_model(config, opts)
  params = hf_io.param_items(model)
  wanted = {hf_io.hf_key_for_path(p): (p, v) for p, v in params}
  files = sorted({os.path.basename(f.path) for f, _ in table.values()})
  missing = sorted(k for k in wanted if k not in table)
  if missing:
    raise KeyError(f"{path}: checkpoint ({', '.join(files[:3])}) lacks {len(missing)} "
                   f"tensor(s) the config needs, first key {missing[0]!r} "
                   f"(e.g. {missing[:4]})")
  tied = config.text.tie_word_embeddings
  extra = sorted(k for k in table if k not in wanted and not (tied and k == "lm_head.weight"))
  if extra:
    f, raw = table[extra[0]]
    raise KeyError(f"{f.path}: unexpected tensor {raw!r} (not a parameter of this "
                   f"config.json's model; {len(extra)} such key(s), e.g. {extra[:4]})")
  np_dtype = np.dtype(opts.param_dtype)
  for key, (p, var) in wanted.items():
    f, raw = table[key]
    shape = tuple(var.get_value().shape)
    want_hf = hf_io.hf_shape(key, shape, config.vision)
    if f.shape(raw) != want_hf:
      raise ValueError(f"{f.path}: tensor {raw!r} has shape {list(f.shape(raw))}, config.json "
                       f"implies {list(want_hf)}")
    if not np.issubdtype(f.dtype(raw), np.floating) and f.dtype(raw).kind != "V":
      raise ValueError(f"{f.path}: tensor {raw!r} has non-float dtype {f.dtype(raw)}")
    view = hf_io.ours_view(key, f.get(raw))
    var.set_value(_place(view, shape, np_dtype, mesh, sharding_lib.variable_axes(var), rules))
  model.hf_source_dir = os.path.abspath(path)
  return model


def _place(view: np.ndarray, shape: tuple[int, ...], np_dtype: np.dtype, mesh: Mesh | None,
           axes, rules) -> jax.Array:
  """A jax array of `view` (lazy, our layout) in `np_dtype`; sharded when `mesh` is given."""
  if mesh is None:
    return jnp.asarray(np.asarray(view, dtype=np_dtype))
  spec = sharding_lib.logical_to_spec(axes, rules, mesh, shape)
  return jax.make_array_from_callback(
      shape, NamedSharding(mesh, spec), lambda idx: np.asarray(view[idx], dtype=np_dtype))
