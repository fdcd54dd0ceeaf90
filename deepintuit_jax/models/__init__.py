"""Model families. `from deepintuit_jax.models import qwen2_5_vl`."""
