"""Runnable studies and benchmarks of lora_jax; run each from the repository root as ``python -m experiments.NAME``."""
