"""Build and check tools that stay out of the `deepintuit_jax` package: the tiny base's
corpus and tower pretraining (scripts/build_tiny_base.py), transformers' reference model
(parity tests, benchmarks)."""
