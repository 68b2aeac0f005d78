"""The registry of the bundled families, the default of every lookup in :mod:`lora_jax.models`."""

from __future__ import annotations

from lora_jax.models.bert import BERT
from lora_jax.models.gpt2 import GPT2
from lora_jax.models.llama import LLAMA
from lora_jax.models.registry import Registry

ARCHITECTURES = Registry((BERT, GPT2, LLAMA))
"""BERT, GPT-2 and Llama; ``ARCHITECTURES.add(entry)`` gives a registry with one more family."""
