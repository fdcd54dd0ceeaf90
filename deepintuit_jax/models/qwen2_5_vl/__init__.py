"""Qwen2.5-VL in Flax NNX, interchangeable with Hugging Face checkpoints."""
from deepintuit_jax.models.qwen2_5_vl.config import (  # noqa: F401
    PRESETS, Qwen2_5_VLConfig, RuntimeOptions, TextConfig, VisionConfig)
