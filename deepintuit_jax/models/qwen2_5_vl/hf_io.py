"""Hugging Face <-> NNX parameter mapping for Qwen2.5-VL.

Our parameter paths mirror the HF keys (see docs/ARCHITECTURE.md), so the mapping is a rule,
not a table: join the path with '.', rename the leaf (`kernel`/`scale`/`embedding` ->
`weight`), transpose linear kernels, and reshape the Conv3d patch embedding.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
PATCH_EMBED = "visual.patch_embed.proj.weight"

# transformers>=5 nests the towers; our files use the original flat layout.
_V5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def normalize_hf_key(key: str) -> str:
  """Maps a transformers>=5 key (`model.visual.*`, `model.language_model.*`) to the flat one."""
  for new, old in _V5_PREFIXES:
    if key.startswith(new):
      return old + key[len(new):]
  return key


def hf_key_for_path(path: tuple, prefix: str = "") -> str:
  """('model', 'layers', 3, 'mlp', 'up_proj', 'kernel') -> 'model.layers.3.mlp.up_proj.weight'."""
  *head, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_HF:
    raise KeyError(f"parameter {'.'.join(map(str, path))}: unknown leaf name {leaf!r}")
  return prefix + ".".join(head + [_LEAF_TO_HF[leaf]])


def to_hf_tensor(key: str, value: np.ndarray) -> np.ndarray:
  """Our layout -> HF layout for the tensor stored under HF `key`."""
  value = np.asarray(value)
  if key == PATCH_EMBED:
    # ours [C*T*P*P, Dv]; HF Conv3d [Dv, C, T, P, P]. C=3, T=2, so P = sqrt(rows / 6).
    rows, dv = value.shape
    p = int(round((rows / 6) ** 0.5))
    if 6 * p * p != rows:
      raise ValueError(f"{key}: cannot infer patch size from kernel shape {value.shape}")
    return np.ascontiguousarray(value.T.reshape(dv, 3, 2, p, p))
  if key.endswith(".weight") and value.ndim == 2 and not key.endswith("embed_tokens.weight"):
    return np.ascontiguousarray(value.T)
  return value


def ours_view(key: str, value: np.ndarray) -> np.ndarray:
  """HF layout -> our layout as a view (transpose / reshape, no copy of a memory map)."""
  if key == PATCH_EMBED:
    return value.reshape(value.shape[0], -1).T
  if key.endswith(".weight") and value.ndim == 2 and not key.endswith("embed_tokens.weight"):
    return value.T
  return value


def from_hf_tensor(key: str, value: np.ndarray, expected_shape: tuple[int, ...],
                   *, source: str = "") -> np.ndarray:
  """HF layout -> our layout, checking the shape. `source` names the file in errors."""
  value = ours_view(key, np.asarray(value))
  if tuple(value.shape) != tuple(expected_shape):
    where = f" in {source}" if source else ""
    raise ValueError(
        f"tensor {key!r}{where}: shape {tuple(value.shape)} (after converting to our layout) "
        f"does not match the model's {tuple(expected_shape)}")
  return value


def param_items(module: nnx.Module):
  """[(path tuple, nnx.Param)] for every parameter of `module`."""
  return list(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def assign_hf_tensors(module: nnx.Module, tensors: Mapping[str, np.ndarray], prefix: str = "",
                      *, strict: bool = True, source: str = "") -> None:
  """Copies HF-named tensors into `module`'s parameters, in place.

  Args:
    module: an NNX module whose parameter paths follow the HF naming convention.
    tensors: HF key -> array (flat or transformers>=5 layout; torch tensors: pass `.numpy()`).
    prefix: HF key prefix of `module` (e.g. "visual." for a bare VisionTower).
    strict: raise on keys the module lacks (`lm_head.weight` of a tied model is ignored).
    source: a file name for error messages.
  """
  tensors = {normalize_hf_key(k): v for k, v in tensors.items()}
  wanted = {}
  for path, var in param_items(module):
    wanted[hf_key_for_path(path, prefix)] = var
  where = f" ({source})" if source else ""
  missing = sorted(k for k in wanted if k not in tensors)
  if missing:
    raise KeyError(f"checkpoint{where} lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
  if strict:
    extra = sorted(k for k in tensors if k.startswith(prefix) and k not in wanted
                   and not (k == "lm_head.weight" and "model.embed_tokens.weight" in wanted))
    if extra:
      raise KeyError(f"checkpoint{where} has {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
  for key, var in wanted.items():
    current = var.get_value()
    value = from_hf_tensor(key, tensors[key], current.shape, source=source)
    var.set_value(jnp.asarray(value, dtype=current.dtype))


def hf_shape(key: str, shape: tuple[int, ...], vision=None) -> tuple[int, ...]:
  """The HF tensor shape of our parameter `shape` stored under `key` (patch embed: Conv3d)."""
  shape = tuple(shape)
  if key == PATCH_EMBED:
    c, t, p = vision.in_channels, vision.temporal_patch_size, vision.patch_size
    return (shape[1], c, t, p, p)
  if key.endswith(".weight") and len(shape) == 2 and not key.endswith("embed_tokens.weight"):
    return shape[::-1]
  return shape


class _ShapeOnlyRngs:
  """Stands in for nnx.Rngs under eval_shape, where no value is ever computed: one constant
  key serves every parameter. (nnx.Rngs' counter update on a tracer costs ~30 ms per
  parameter in flax 0.12, about 30 s for the 72B model.)"""

  def params(self):
    return jax.random.key(0)


def abstract_model(config, opts=None):
  """The model of `config` built with nnx.eval_shape (ShapeDtypeStruct leaves, no memory)."""
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
  opts = opts or RuntimeOptions()
  return nnx.eval_shape(lambda: Qwen2_5_VL(config, opts, rngs=_ShapeOnlyRngs()))


def hf_param_shapes(config) -> dict[str, tuple[int, ...]]:
  """HF key (flat layout) -> HF tensor shape for every parameter of a model of `config`.

  Built abstractly (no memory); the lm_head is absent when the embeddings are tied.
  """
  return {hf_key_for_path(path): hf_shape(hf_key_for_path(path), var.get_value().shape,
                                          config.vision)
          for path, var in param_items(abstract_model(config))}

