"""Text decoder parity with transformers' Qwen2_5_VLForConditionalGeneration (fp32, tiny configs)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from deepintuit_jax.models.qwen2_5_vl.config import (  # noqa: E402
    Qwen2_5_VLConfig, TextConfig, VisionConfig)
from deepintuit_jax.models.qwen2_5_vl.hf_io import assign_hf_tensors  # noqa: E402
from deepintuit_jax.models.qwen2_5_vl.text import TextModel  # noqa: E402

# (hidden, heads, kv heads, mrope_section, theta, tied, layers): GQA 2:1, 4:1 and MHA;
# head dims 16, 12, 32.
CASES = {
    "gqa2_tied": (64, 4, 2, (2, 3, 3), 1e6, True, 2),
    "gqa4_untied": (48, 4, 1, (2, 2, 2), 1e4, False, 2),
    "mha_hd32": (64, 2, 2, (4, 6, 6), 5e5, False, 3),
}


def tiny_config(hidden, heads, kv, mrope, theta, tied, layers) -> Qwen2_5_VLConfig:
  return Qwen2_5_VLConfig(
      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                          out_hidden_size=hidden, fullatt_block_indexes=(0,)),
      text=TextConfig(vocab_size=97, hidden_size=hidden, intermediate_size=80,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, rope_theta=theta, mrope_section=mrope,
                      tie_word_embeddings=tied),
      image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)


def hf_reference(cfg: Qwen2_5_VLConfig, seed: int = 0):
  """A transformers model with every norm weight and bias randomised; returns (model, tensors)."""
  d = cfg.to_hf_dict()
  d["vision_config"]["tokens_per_second"] = int(d["vision_config"]["tokens_per_second"])
  hc = transformers.Qwen2_5_VLConfig(**d)
  hc._attn_implementation = "eager"
  torch.manual_seed(seed)
  ref = transformers.Qwen2_5_VLForConditionalGeneration(hc).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith(".bias") or "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name or "ln_q" in name
                else 0.5 * torch.randn_like(p))
  tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  return ref, tensors


def ours_text(cfg: Qwen2_5_VLConfig, tensors) -> TextModel:
  model = TextModel(cfg.text, rngs=nnx.Rngs(0))
  assign_hf_tensors(model, tensors, prefix="model.")
  return model


def text_logits(model: TextModel, cfg: Qwen2_5_VLConfig, tensors, ids, mask, pos, **kw):
  h, hidden, _ = model(model.embed_tokens(jnp.asarray(ids)), jnp.asarray(mask), pos, **kw)
  w = tensors["lm_head.weight"]
  return np.asarray(h) @ w.T, hidden


def close(a, b, rel=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rel, atol=rel * float(np.abs(b).max()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoder_logits_and_hidden_states_match(case):
  cfg = tiny_config(*CASES[case])
  ref, tensors = hf_reference(cfg)
  model = ours_text(cfg, tensors)
  rng = np.random.default_rng(1)
  b, t = 3, 11
  ids = rng.integers(0, 90, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, 8:] = 0  # right padding
  mask[2, :4] = 0  # left padding
  # Distinct rows exercise the mrope section -> row mapping; monotone as real ones are.
  pos = np.cumsum(rng.integers(0, 3, (3, b, t)), axis=-1)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos), output_hidden_states=True)
  logits, hidden = text_logits(model, cfg, tensors, ids, mask, pos, output_hidden_states=True)
  valid = mask.astype(bool)
  close(logits[valid], out.logits.numpy()[valid])
  assert len(hidden) == len(out.hidden_states) == cfg.text.num_hidden_layers + 1
  for ours, theirs in zip(hidden, out.hidden_states):
    close(np.asarray(ours)[valid], theirs.numpy()[valid])


def test_default_positions_match_hf_text_positions():
  """Without position_ids and without padding we use 0..T-1, as HF does."""
  cfg = tiny_config(*CASES["gqa2_tied"])
  ref, tensors = hf_reference(cfg, seed=3)
  model = ours_text(cfg, tensors)
  ids = np.random.default_rng(2).integers(0, 90, (2, 9))
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids)).logits.numpy()
  logits, _ = text_logits(model, cfg, tensors, ids, np.ones_like(ids), None)
  close(logits, expected)


def test_remat_and_bf16_run():
  """Remat policies give the same fp32 result; bf16 compute stays close to fp32."""
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  cfg = tiny_config(*CASES["gqa4_untied"])
  _, tensors = hf_reference(cfg, seed=4)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 90, (2, 7)))
  outs = {}
  for name, opts in {"none": RuntimeOptions(), "full": RuntimeOptions(remat="full"),
                     "dots": RuntimeOptions(remat="dots_saveable"),
                     "bf16": RuntimeOptions(dtype=jnp.bfloat16)}.items():
    m = TextModel(cfg.text, opts, rngs=nnx.Rngs(0))
    assign_hf_tensors(m, tensors, prefix="model.")
    h, _, _ = m(m.embed_tokens(ids))
    outs[name] = np.asarray(h, np.float32)
  close(outs["full"], outs["none"], 1e-6)
  close(outs["dots"], outs["none"], 1e-6)
  assert np.abs(outs["bf16"] - outs["none"]).max() < 0.1 * np.abs(outs["none"]).max()

  # Gradients through nnx.remat equal the plain ones.
  def grads(opts):
    m = TextModel(cfg.text, opts, rngs=nnx.Rngs(0))
    assign_hf_tensors(m, tensors, prefix="model.")
    loss = lambda m: jnp.sum(m(m.embed_tokens(ids))[0] ** 2)
    return nnx.to_flat_state(nnx.grad(loss)(m))
  plain = grads(RuntimeOptions())
  for path, g in grads(RuntimeOptions(remat="full")):
    close(g[...], dict(plain)[path][...], 1e-5)
