"""Sharded loading and forward on 8 CPU devices: shardings follow the rules, logits agree."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deepintuit_jax.core import sharding
from deepintuit_jax.models import qwen2_5_vl, tiny
from deepintuit_jax.models.qwen2_5_vl import hf_io, rope, vision

IMG, VID, VS, VE = (tiny.TOKEN_IDS[t] for t in (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))


F, T = "fsdp", "tensor"
# The sharding every tiny-model parameter must get, written out by hand from the rules'
# intent (matrices: model width over fsdp, heads / MLP / vocab over tensor; norms follow the
# width; the fused vision qkv and the patch dimension stay whole). Every dimension of the
# tiny model divides the mesh sizes tested, so nothing is dropped.
_EXPECTED = [
    (r"lm_head\.kernel$", (F, T)), (r"embed_tokens\.embedding$", (T, F)),
    (r"(norm\d?|layernorm|ln_q)\.scale$", (F,)),
    (r"(gate_proj|up_proj|q_proj|k_proj|v_proj)\.kernel$", (F, T)),
    (r"(gate_proj|up_proj|q_proj|k_proj|v_proj)\.bias$", (T,)),
    (r"(down_proj|o_proj|attn\.proj)\.kernel$", (T, F)),
    (r"(down_proj|attn\.proj)\.bias$", (F,)),
    (r"qkv\.kernel$", (F, None)), (r"qkv\.bias$", (None,)),
    (r"merger\.mlp\.0\.kernel$", (F, T)), (r"merger\.mlp\.0\.bias$", (T,)),
    (r"merger\.mlp\.2\.kernel$", (T, F)), (r"merger\.mlp\.2\.bias$", (F,)),
    (r"patch_embed\.proj\.kernel$", (None, F)),
]


def _expected_spec(path) -> P:
  import re
  name = ".".join(map(str, path))
  (spec,) = [s for pat, s in _EXPECTED if re.search(pat, name)] or [None]
  assert spec is not None, f"no expected sharding written for {name}"
  return P(*spec)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny.write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), seed=5)


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh((1, 4, 2))
  assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(64, 128)) == P("fsdp",
                                                                                     "tensor")
  # An axis that does not divide its dimension is dropped; a mesh axis is used once.
  assert sharding.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(6, 128)) == P(None,
                                                                                    "tensor")
  assert sharding.logical_to_spec(("heads", "mlp"), mesh=mesh, shape=(8, 8)) == P("tensor", None)
  assert sharding.logical_to_spec(("batch", None), mesh=mesh) == P(("data", "fsdp"), None)
  with pytest.raises(KeyError, match="nope"):
    sharding.logical_to_spec(("nope",))
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((1, 3, 2))


@nnx.jit
def _forward(model, ids, mask, kw):
  return model(ids, mask, **kw).logits


def _inputs():
  """8 right-padded rows (the batch splits over every mesh shape), one video each."""
  rng = np.random.default_rng(0)
  vgrid = np.array([[2, 4, 4], [2, 2, 4]] * 4)
  txt = lambda n: list(rng.integers(8, 900, n))  # noqa: E731
  rows = [txt(3) + [VS] + [VID] * 8 + [VE] + txt(3), txt(2) + [VS] + [VID] * 4 + [VE] + txt(8)]
  rows = rows * 4
  t = max(map(len, rows))
  ids, mask = np.zeros((8, t), np.int32), np.zeros((8, t), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
    ids[i, 0] = 10 + i  # rows differ
  return ids, mask, vgrid, rng.standard_normal((192, 1176)).astype(np.float32)


def _kw(cfg, ids, mask, vgrid, pixels):
  pos, _ = rope.get_rope_index(cfg, ids, mask, None, vgrid, np.array([1.0, 2.0] * 4))
  return dict(pixel_values_videos=pixels, video_layout=vision.vision_layout(vgrid, cfg.vision),
              position_ids=pos)


@pytest.fixture(scope="module")
def reference(ckpt):
  model = qwen2_5_vl.from_pretrained(ckpt, dtype=jnp.float32)
  ids, mask, vgrid, pixels = _inputs()
  return np.asarray(_forward(model, ids, mask, _kw(model.config, ids, mask, vgrid, pixels)))


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_load_and_forward_match_unsharded(ckpt, reference, shape):
  mesh = sharding.make_mesh(shape)
  model = qwen2_5_vl.from_pretrained(ckpt, dtype=jnp.float32, mesh=mesh)
  for path, var in hf_io.param_items(model):
    assert var.get_value().sharding == NamedSharding(mesh, _expected_spec(path)), path
  emb = model.model.embed_tokens.embedding[...]
  assert emb.sharding.spec == P("tensor", "fsdp")
  # Each device holds only its slice (loaded straight into the sharding).
  assert {s.data.shape for s in emb.addressable_shards} == {(1088 // shape[2], 64 // shape[1])}
  ids, mask, vgrid, pixels = _inputs()
  batch = sharding.batch_sharding(mesh, 2)
  ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
  got = np.asarray(_forward(model, ids_s, mask_s, _kw(model.config, ids, mask, vgrid, pixels)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], reference[valid], rtol=1e-5,
                             atol=1e-5 * np.abs(reference).max())


def test_shard_model_and_resize_keep_shardings(ckpt):
  mesh = sharding.make_mesh((1, 4, 2))
  model = qwen2_5_vl.from_pretrained(ckpt, dtype=jnp.float32)
  old = np.asarray(model.lm_head.kernel[...])
  sharding.shard_model(model, mesh)
  for path, var in hf_io.param_items(model):
    assert var.get_value().sharding == NamedSharding(mesh, _expected_spec(path)), path
  bigger = qwen2_5_vl.resize_token_embeddings(model, 1152, seed=1, std=0.5)
  assert bigger.config.text.vocab_size == 1152 and model.config.text.vocab_size == 1088
  emb, head = bigger.model.embed_tokens.embedding[...], bigger.lm_head.kernel[...]
  assert emb.shape == (1152, 64) and head.shape == (64, 1152)
  assert emb.sharding.spec == P("tensor", "fsdp") and head.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(emb[:1088]),
                                np.asarray(model.model.embed_tokens.embedding[...]))
  np.testing.assert_array_equal(np.asarray(head[:, :1088]), old)
  new_rows = np.asarray(emb[1088:])
  assert abs(new_rows.std() - 0.5) < 0.02 and abs(new_rows.mean()) < 0.02
  assert not np.allclose(np.asarray(head[:, 1088:]).T, new_rows)  # different keys
  np.testing.assert_array_equal(np.asarray(bigger.model.norm.scale[...]),
                                np.asarray(model.model.norm.scale[...]))
  with pytest.raises(ValueError, match="shrinking"):
    qwen2_5_vl.resize_token_embeddings(model, 1000)


def test_batch_shardings_follow_the_row_axis_table():
  """Un-grouped on 8 devices: per-row arrays split on their row axis (as the table says),
  vision inputs replicated, a key missing from the table refused; 8 groups: every array
  split on the group axis."""
  mesh = sharding.make_mesh((4, 2, 1))
  dp = ("data", "fsdp")
  b = {"input_ids": np.zeros((1, 8, 5), np.int32), "loss_mask": np.zeros((1, 8, 5), np.int32),
       "position_ids": np.zeros((1, 3, 8, 5), np.int32),
       "pixel_values_videos": np.zeros((1, 12, 4), np.float32),
       "advantages": np.zeros((1, 8), np.float32),
       "old_logprobs": np.zeros((1, 8, 5), np.float32)}
  with pytest.raises(KeyError, match="advantages"):
    sharding.batch_shardings(b, mesh)
  table = dict(sharding.ROW_AXES, advantages=0, old_logprobs=0)
  sh = sharding.batch_shardings(b, mesh, row_axes=table)
  assert sh["input_ids"].spec == P(None, dp, None) == sh["old_logprobs"].spec
  assert sh["position_ids"].spec == P(None, None, dp, None)
  assert sh["advantages"].spec == P(None, dp)
  assert sh["pixel_values_videos"].spec == P()
  placed = sharding.place_batch(b, mesh, table)
  assert {s.data.shape for s in placed["advantages"].addressable_shards} == {(1, 1)}
  grouped = jax.tree.map(lambda x: np.repeat(x, 8, axis=0), b)
  sh = sharding.batch_shardings(grouped, mesh)  # whole groups: no table needed
  assert sh["advantages"].spec == P(dp, None)
  assert sh["pixel_values_videos"].spec == P(dp, None, None)


def test_vmap_groups_names_the_data_axes_and_tells_the_rows_inside():
  """Under a mesh, a vmap over G groups that the data axes divide maps G onto them
  (spmd_axis_name); inside, rows are not split over those axes again (row_axes)."""
  mesh = sharding.make_mesh((2, 4, 1))
  seen = []

  def per_group(x):
    seen.append(sharding.row_axes(sharding.context_mesh(), x.shape[0]))
    return x * 2

  x = jnp.arange(8 * 8 * 2, dtype=jnp.float32).reshape(8, 8, 2)  # [G, rows, 2]
  with jax.set_mesh(mesh):
    assert sharding.row_axes(sharding.context_mesh(), 8) == ("data", "fsdp")
    assert sharding.row_axes(sharding.context_mesh(), 6) == ()  # 8 does not divide 6 rows
    out = jax.jit(lambda x: sharding.vmap_groups(per_group, 0, 8)(x))(x)
    jax.jit(lambda x: sharding.vmap_groups(per_group, 0, 3)(x[:3]))(x)  # 3 groups: no spmd
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
  assert seen == [(), ("data", "fsdp")]
  assert sharding.context_mesh() is None
