"""Video input for Qwen2.5-VL: decoding + frame sampling, and the Qwen2-VL preprocessing.

Public API (implementations in `video_decode.py` and `video_preprocess.py`):
  VIDEO_EXTENSIONS, VideoClip, load_video, sample_indices_release, sample_indices_fps,
  smart_resize, resize_bicubic_aa, preprocess_video, preprocess_image, second_per_grid.
"""
from deepintuit_jax.data.video_decode import (  # noqa: F401  (re-exports)
    IMAGE_EXTENSIONS, SAMPLING, UNSUPPORTED_FORMAT, VIDEO_EXTENSIONS, VideoClip, load_video,
    natural_key, sample_indices_fps, sample_indices_release)
from deepintuit_jax.data.video_preprocess import (  # noqa: F401  (re-exports)
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_image, preprocess_video, resize_bicubic_aa,
    second_per_grid, smart_resize)
