"""Qwen2.5-VL in Flax NNX, interchangeable with Hugging Face checkpoints.

    from deepintuit_jax.models import qwen2_5_vl
    model = qwen2_5_vl.from_pretrained(path, dtype=jnp.bfloat16, mesh=None)
    out = model(input_ids, attention_mask, pixel_values_videos=..., video_grid_thw=...)
    qwen2_5_vl.save_pretrained(model, out_dir)

The names below are imported on first use, so that the NumPy-only host modules (`rope`,
`vision_layout`) import without jax: `deepintuit_jax.serving` patches transformers' rope
with `rope` in a serving environment that has torch but no jax.
"""
import importlib

_EXPORTS = {
    "PRESETS": "config", "Qwen2_5_VLConfig": "config", "RuntimeOptions": "config",
    "TextConfig": "config", "VisionConfig": "config", "from_pretrained": "hf_load",
    "save_pretrained": "hf_save", "abstract_model": "hf_io", "Output": "model",
    "Qwen2_5_VL": "model", "resize_token_embeddings": "resize", "KVCache": "text",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value
