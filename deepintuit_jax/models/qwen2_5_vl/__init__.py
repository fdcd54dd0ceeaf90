"""Qwen2.5-VL in Flax NNX, interchangeable with Hugging Face checkpoints.

    from deepintuit_jax.models import qwen2_5_vl
    model = qwen2_5_vl.from_pretrained(path, dtype=jnp.bfloat16, mesh=None)
    out = model(input_ids, attention_mask, pixel_values_videos=..., video_grid_thw=...)
    qwen2_5_vl.save_pretrained(model, out_dir)
"""
from deepintuit_jax.models.qwen2_5_vl.config import (  # noqa: F401
    PRESETS, Qwen2_5_VLConfig, RuntimeOptions, TextConfig, VisionConfig)
from deepintuit_jax.models.qwen2_5_vl.hf_load import from_pretrained  # noqa: F401
from deepintuit_jax.models.qwen2_5_vl.hf_save import save_pretrained  # noqa: F401
from deepintuit_jax.models.qwen2_5_vl.hf_io import abstract_model  # noqa: F401
from deepintuit_jax.models.qwen2_5_vl.model import Output, Qwen2_5_VL  # noqa: F401
from deepintuit_jax.models.qwen2_5_vl.resize import resize_token_embeddings  # noqa: F401
from deepintuit_jax.models.qwen2_5_vl.text import KVCache  # noqa: F401
