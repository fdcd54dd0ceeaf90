"""Checkpoint I/O against transformers (fp32, exact): both directions, shards, bf16, bad input."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.models import qwen2_5_vl, safetensors_io, tiny
from tools import hf_reference
from deepintuit_jax.models.qwen2_5_vl import hf_io, rope, vision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE = (tiny.TOKEN_IDS[t] for t in (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))


def _flat(sd) -> dict[str, np.ndarray]:
  """transformers state dict -> flat-layout NumPy tensors."""
  return {hf_io.normalize_hf_key(k): v.detach().float().numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A transformers-saved tiny model (randomised norms and biases), with the tokenizer files."""
  src = tiny.write_tiny_checkpoint(str(tmp_path_factory.mktemp("src")), seed=3)
  torch.manual_seed(0)
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(src).eval()
  hf_reference.randomize_norms_and_biases(ref)
  out = str(tmp_path_factory.mktemp("hf"))
  ref.save_pretrained(out)
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(os.path.join(src, f), out)
  return out, ref


@nnx.jit
def _forward(model, ids, mask, kw):
  return model(ids, mask, **kw)


def _inputs(seed: int = 0):
  """A right-padded batch of two rows: image + video, and video only, with host positions."""
  rng = np.random.default_rng(seed)
  igrid, vgrid = np.array([[1, 4, 4]]), np.array([[2, 4, 4], [2, 2, 4]])
  txt = lambda n: list(rng.integers(8, 900, n))  # noqa: E731
  rows = [txt(3) + [VS] + [IMG] * 4 + [VE] + txt(2) + [VS] + [VID] * 8 + [VE] + txt(3),
          txt(2) + [VS] + [VID] * 4 + [VE] + txt(4)]
  t = max(map(len, rows))
  ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  pix = lambda g: rng.standard_normal((int(g.prod(-1).sum()), 1176)).astype(np.float32)  # noqa
  hf = dict(pixel_values=pix(igrid), image_grid_thw=igrid, pixel_values_videos=pix(vgrid),
            video_grid_thw=vgrid, second_per_grid_ts=np.array([1.0, 0.5], np.float32))
  return ids, mask, hf


def _ours_kw(cfg, ids, mask, hf):
  kw = dict(pixel_values=hf["pixel_values"], pixel_values_videos=hf["pixel_values_videos"],
            image_layout=vision.vision_layout(hf["image_grid_thw"], cfg.vision),
            video_layout=vision.vision_layout(hf["video_grid_thw"], cfg.vision))
  kw["position_ids"], _ = rope.get_rope_index(  # the installed transformers' (>= 5.3) rule
      cfg, ids, mask, hf["image_grid_thw"], hf["video_grid_thw"], hf["second_per_grid_ts"],
      convention="transformers_5.3")
  return kw


def test_transformers_save_then_our_load_gives_same_logits(hf_dir):
  path, ref = hf_dir
  model = qwen2_5_vl.from_pretrained(path, dtype=jnp.float32)
  assert model.hf_source_dir == os.path.abspath(path)
  assert model.model.embed_tokens.embedding[...].dtype == jnp.float32
  ids, mask, hf = _inputs()
  # transformers>=5 computes 3D positions only with the processor's mm_token_type_ids.
  types = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               mm_token_type_ids=torch.tensor(types),
               **{k: torch.tensor(v) for k, v in hf.items()}).logits.numpy()
  got = np.asarray(_forward(model, ids, mask, _ours_kw(model.config, ids, mask, hf)).logits)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


def test_our_save_then_transformers_load_is_bit_exact(hf_dir, tmp_path):
  path, ref = hf_dir
  model = qwen2_5_vl.from_pretrained(path, dtype=jnp.float32)
  out = qwen2_5_vl.save_pretrained(model, str(tmp_path / "out"))
  files = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
          "chat_template.jinja", "tokenizer_config.json"} <= files
  assert "model.safetensors.index.json" not in files
  back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  want, got = _flat(ref.state_dict()), _flat(back.state_dict())
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_sharded_save_with_index_loads_back_exactly(hf_dir, tmp_path):
  model = qwen2_5_vl.from_pretrained(hf_dir[0], dtype=jnp.float32)
  out = qwen2_5_vl.save_pretrained(model, str(tmp_path / "sharded"), max_shard_size="100KB")
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
  assert all(os.path.getsize(os.path.join(out, s)) <= 100_000 + 4096 or
             len(safetensors_io.read_header(os.path.join(out, s))[0]) == 1 for s in shards)
  assert index["metadata"]["total_size"] == 4 * model.num_params()
  again = qwen2_5_vl.from_pretrained(out, dtype=jnp.float32)
  for (p, a), (q, b) in zip(hf_io.param_items(model), hf_io.param_items(again), strict=True):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
  back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  want = _flat(hf_dir[1].state_dict())
  for k, v in _flat(back.state_dict()).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_bf16_save_and_load(hf_dir, tmp_path):
  model = qwen2_5_vl.from_pretrained(hf_dir[0], dtype=jnp.float32)
  out = qwen2_5_vl.save_pretrained(model, str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  assert back.dtype == torch.bfloat16
  want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
          for k, v in _flat(hf_dir[1].state_dict()).items()}
  for k, v in _flat(back.state_dict()).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  ours = qwen2_5_vl.from_pretrained(out)  # dtype bf16, params bf16 by default.
  emb = ours.model.embed_tokens.embedding[...]
  assert emb.dtype == jnp.bfloat16 and ours.opts.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(emb, np.float32), want["model.embed_tokens.weight"])
  fp32 = qwen2_5_vl.from_pretrained(out, param_dtype=jnp.float32)
  assert fp32.model.norm.scale[...].dtype == jnp.float32
  # A bf16 file written by transformers (safetensors' own writer) reads the same.
  back.save_pretrained(str(tmp_path / "hf_bf16"))
  theirs = qwen2_5_vl.from_pretrained(str(tmp_path / "hf_bf16"), param_dtype=jnp.float32)
  for (p, a), (q, b) in zip(hf_io.param_items(fp32), hf_io.param_items(theirs), strict=True):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


# ------------------------------------------------------------------------------ bad input
def _copy(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite(path: str, fn) -> None:
  """Applies fn to the tensors of path/model.safetensors and writes them back."""
  f = os.path.join(path, "model.safetensors")
  r = safetensors_io.SafetensorsFile(f)
  tensors = {k: np.array(r.get(k)) for k in r.names()}
  del r
  safetensors_io.save_file(fn(tensors), f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tiny.write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), seed=0)


def test_wrong_shape_names_file_and_key(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path / "d")
  key = "model.layers.1.mlp.up_proj.weight"
  _rewrite(d, lambda t: {**t, key: t[key][:-1]})
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{key}' has shape \[127, "):
    qwen2_5_vl.from_pretrained(d)


def test_missing_and_unexpected_keys_name_them(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path / "missing")
  key = "visual.blocks.1.attn.qkv.bias"
  _rewrite(d, lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(KeyError, match=rf"model\.safetensors.*lacks 1 tensor.*'{key}'"):
    qwen2_5_vl.from_pretrained(d)
  d = _copy(tiny_dir, tmp_path / "extra")
  _rewrite(d, lambda t: {**t, "model.layers.7.mlp.up_proj.weight": t["model.norm.weight"]})
  with pytest.raises(KeyError, match=r"model\.safetensors: unexpected tensor "
                                     r"'model\.layers\.7\.mlp\.up_proj\.weight'"):
    qwen2_5_vl.from_pretrained(d)


def test_unsupported_architecture(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path / "arch")
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(model_type="llava", architectures=["LlavaForConditionalGeneration"])
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"config\.json: unsupported architecture.*llava"):
    qwen2_5_vl.from_pretrained(d)


def test_pickled_weights_are_refused(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path / "pickled")
  os.remove(os.path.join(d, "model.safetensors"))
  with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*not loaded.*unsafe.*safetensors"):
    qwen2_5_vl.from_pretrained(d)


@pytest.fixture(scope="module")
def sharded_dir(tiny_dir, tmp_path_factory):
  model = qwen2_5_vl.from_pretrained(tiny_dir, dtype=jnp.float32)
  return qwen2_5_vl.save_pretrained(model, str(tmp_path_factory.mktemp("sh")),
                                    max_shard_size=300_000)  # 4 or more shards


def _shards(path: str) -> list[str]:
  return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def test_missing_shard_names_file_and_key(sharded_dir, tmp_path):
  d = _copy(sharded_dir, tmp_path / "noshard")
  gone = _shards(d)[1]
  os.remove(os.path.join(d, gone))
  with pytest.raises(FileNotFoundError,
                     match=rf"index\.json maps \d+ tensor.*key '.*'.*{gone}.*missing shard"):
    qwen2_5_vl.from_pretrained(d)


def test_corrupt_index_and_truncated_shard(sharded_dir, tmp_path):
  d = _copy(sharded_dir, tmp_path / "badindex")
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    f.write('{"weight_map": {"model.norm.weight": ')
  with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: corrupt index JSON"):
    qwen2_5_vl.from_pretrained(d)
  d = _copy(sharded_dir, tmp_path / "badmap")
  with open(os.path.join(d, "model.safetensors.index.json")) as f:
    index = json.load(f)
  key = sorted(index["weight_map"])[0]
  index["weight_map"][key] = next(s for s in _shards(d) if s != index["weight_map"][key])
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with pytest.raises(ValueError, match=rf"index\.json: key '{key}' is mapped to"):
    qwen2_5_vl.from_pretrained(d)
  d = _copy(sharded_dir, tmp_path / "trunc")
  name = _shards(d)[-1]
  shard = os.path.join(d, name)
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 10)
  with pytest.raises(ValueError, match=rf"{name}: tensor '.*' has byte range .*truncated"):
    qwen2_5_vl.from_pretrained(d)


# ------------------------------------------------------------------------------ layouts, resize
def test_transformers5_nested_key_layout_loads_the_same(tiny_dir, tmp_path):
  d = _copy(tiny_dir, tmp_path / "nested")
  nest = lambda k: ("model.visual." + k[7:] if k.startswith("visual.")  # noqa: E731
                    else "model.language_model." + k[6:] if k.startswith("model.") else k)
  _rewrite(d, lambda t: {nest(k): v for k, v in t.items()})
  names = safetensors_io.SafetensorsFile(os.path.join(d, "model.safetensors")).names()
  assert "model.language_model.norm.weight" in names and "model.visual.merger.ln_q.weight" in names
  flat, nested = (qwen2_5_vl.from_pretrained(p, dtype=jnp.float32) for p in (tiny_dir, d))
  for (p, a), (q, b) in zip(hf_io.param_items(flat), hf_io.param_items(nested), strict=True):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_resize_tied_model_then_transformers_loads_it(tmp_path):
  cfg = tiny.tiny_config(text=dict(tie_word_embeddings=True))
  src = tiny.write_tiny_checkpoint(str(tmp_path / "tied"), seed=2, config=cfg)
  model = qwen2_5_vl.from_pretrained(src, dtype=jnp.float32)
  assert model.lm_head is None
  tok = tiny.build_tokenizer(seed=2)
  added = tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>", "normal", "abnormal"],
                         special_tokens=True)
  assert added == 6 and len(tok) <= 1088
  bigger = qwen2_5_vl.resize_token_embeddings(model, 1152, seed=0)
  out = qwen2_5_vl.save_pretrained(bigger, str(tmp_path / "out"))
  back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  assert back.config.text_config.vocab_size == 1152
  emb = back.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(emb[:1088], np.asarray(model.model.embed_tokens.embedding[...]))
  assert 0.015 < emb[1088:].std() < 0.025
  ids = np.array([[5, 100, 1100, 1150, 7 + 1]])
  with torch.no_grad():
    want = back(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(bigger(ids).logits), want, rtol=1e-5, atol=1e-6)
