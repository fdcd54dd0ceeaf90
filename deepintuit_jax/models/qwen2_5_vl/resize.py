"""Vocabulary resizing: new embedding (and untied lm_head) rows for added tokens.

DeepIntuit adds the class labels, `<think>`/`</think>`/`<answer>`/`</answer>` and
`<NO_POLICY>` to the tokenizer; their rows start as normal(0, std) draws.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deepintuit_jax.models.qwen2_5_vl import hf_io

_VOCAB_PARAMS = (("model", "embed_tokens", "embedding"), ("lm_head", "kernel"))


def _spec_for(old: jax.Array, new_shape: tuple[int, ...]):
  """The old array's NamedSharding, with mesh axes that no longer divide a dim dropped."""
  sh = getattr(old, "sharding", None)
  if not isinstance(sh, NamedSharding):
    return None
  spec = list(sh.spec) + [None] * (len(new_shape) - len(sh.spec))
  for i, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for a in names:
      size *= sh.mesh.shape[a]
    if new_shape[i] % size:
      spec[i] = None
  return NamedSharding(sh.mesh, P(*spec))


def _grow(old: jax.Array, new_rows: int, axis: int, key: jax.Array, std: float) -> jax.Array:
  """old with `new_rows` normal(0, std) rows appended along `axis`, in old's dtype and
  (where it still divides) old's sharding."""
  new_shape = list(old.shape)
  new_shape[axis] += new_rows
  out_sharding = _spec_for(old, tuple(new_shape))

  def fn(x):
    shape = list(x.shape)
    shape[axis] = new_rows
    extra = (std * jax.random.normal(key, shape, jnp.float32)).astype(x.dtype)
    return jnp.concatenate([x, extra], axis=axis)
  return jax.jit(fn, out_shardings=out_sharding)(old)


def resize_token_embeddings(model, new_vocab_size: int, *, seed: int = 0, std: float = 0.02):
  """A new Qwen2_5_VL with `new_vocab_size` embedding rows (and lm_head columns, untied).

  The old rows are unchanged (the same arrays for every other parameter); the new rows are
  normal(0, std) from `seed` (the lm_head uses a different key). config.text.vocab_size is
  updated. Shardings are kept. Shrinking is refused.
  """
  cfg = model.config
  old_v = cfg.text.vocab_size
  if new_vocab_size < old_v:
    raise ValueError(f"resize_token_embeddings: {new_vocab_size} < current vocab {old_v} "
                     "(shrinking would drop trained rows)")
  new_cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=new_vocab_size))
  new = hf_io.abstract_model(new_cfg, model.opts)
  old_params = dict(hf_io.param_items(model))
  keys = jax.random.split(jax.random.key(seed), 2)
  for path, var in hf_io.param_items(new):
    value = old_params[path].get_value()
    if path in _VOCAB_PARAMS and new_vocab_size != old_v:
      k = _VOCAB_PARAMS.index(path)
      value = _grow(value, new_vocab_size - old_v, 0 if k == 0 else 1, keys[k], std)
    var.set_value(value)
  if hasattr(model, "hf_source_dir"):
    new.hf_source_dir = model.hf_source_dir
  return new
