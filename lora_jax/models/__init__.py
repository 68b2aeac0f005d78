"""Pretrained transformers in Flax linen that load Hugging Face safetensors.

    model, params = lora_jax.models.from_pretrained(path)  # a Hugging Face model directory
    spec = lora_jax.models.lora_spec(model, "qv", rank=8)
    lora = lora_jax.init(key, params, spec)
    out = model.apply({"params": lora_jax.combine(params, lora, spec)}, input_ids, attention_mask)
    lora_jax.models.save_pretrained(out_dir, model, lora_jax.merge(params, lora, spec), source=path)

Models: :class:`BertModel`, :class:`BertForSequenceClassification`,
:class:`GPT2LMHeadModel`, :class:`LlamaForCausalLM`; each takes
``scan_layers``, ``dtype`` and ``param_dtype``.

Each family (``bert/``, ``gpt2/``, ``llama/``) is one :class:`Architecture` in the registry
:data:`ARCHITECTURES`; another family is one more entry, passed as ``registry=ARCHITECTURES.add(entry)``
(see :mod:`lora_jax.models.registry`).
"""

from lora_jax._extras import require

for _module in ("flax", "safetensors", "tokenizers"):
    require(_module, "models")  # before the modules below import them, so that a missing one names its extra

from lora_jax.models.bert import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertOutput,
    classifier_apply_fn,
    mean_pool,
    sentence_pooling,
)
from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.common.config import ConfigError
from lora_jax.models.common.convert import CheckpointError
from lora_jax.models.common.decoder import CausalLM, DecoderBlock, DecoderHidden, DecoderOutput, causal_lm_apply_fn
from lora_jax.models.common.export import checkpoint_tensors, save_pretrained
from lora_jax.models.common.generate import cache_for, generate
from lora_jax.models.common.layers import init_cache
from lora_jax.models.common.loading import build_model, checkpoint_files, from_pretrained, hf_names, load_params
from lora_jax.models.common.stacking import REMAT_POLICIES, stack_layers, unstack_layers
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.models.partitioning import partition_rules, tensor_parallel_rules
from lora_jax.models.presets import HEAD_PATTERN, METHODS, lora_spec, method_spec
from lora_jax.models.quantizing import quant_rules
from lora_jax.models.registry import Architecture, Build, KVCache, Linear, Registry
from lora_jax.models.text import (
    embed_texts,
    encode,
    l2_normalize,
    load_tokenizer,
    sentence_embeddings,
)
from lora_jax.scheduling import MEMORY_SCHEDULER_FLAG

__all__ = [
    "MEMORY_SCHEDULER_FLAG",
    "REMAT_POLICIES",
    "ARCHITECTURES",
    "HEAD_PATTERN",
    "METHODS",
    "Architecture",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "Build",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "DecoderBlock",
    "DecoderHidden",
    "DecoderOutput",
    "GPT2Config",
    "GPT2LMHeadModel",
    "KVCache",
    "Linear",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Registry",
    "build_model",
    "cache_for",
    "causal_lm_apply_fn",
    "checkpoint_tensors",
    "classifier_apply_fn",
    "checkpoint_files",
    "embed_texts",
    "encode",
    "from_pretrained",
    "generate",
    "hf_names",
    "init_cache",
    "l2_normalize",
    "load_params",
    "load_tokenizer",
    "lora_spec",
    "method_spec",
    "quant_rules",
    "partition_rules",
    "save_pretrained",
    "mean_pool",
    "sentence_embeddings",
    "sentence_pooling",
    "stack_layers",
    "tensor_parallel_rules",
    "unstack_layers",
]
