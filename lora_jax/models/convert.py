"""Hugging Face checkpoint names -> Flax param paths, per architecture.

A :class:`Tensor` says where one checkpoint tensor (or one part of a fused
tensor) goes in the unrolled param tree and how to reshape it. PyTorch
``Linear`` weights are ``[out, in]`` and are transposed; GPT-2's ``Conv1D``
weights are already ``[in, out]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from lora_jax.errors import LoraError
from lora_jax.models.config import BertConfig, GPT2Config, LlamaConfig, ModelConfig
from lora_jax.paths import PathTuple, path_str, unrolled_key


class CheckpointError(LoraError):
    """Checkpoint tensors that do not fit the model: a wrong shape or missing tensors."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where a checkpoint tensor goes.

    Attributes:
      path: the param path in the unrolled layout.
      transpose: the checkpoint stores ``[out, in]``.
      in_ndim: how many leading axes of the Flax kernel are inputs; None copies
        the tensor as is, 0 flattens the target (a ``[H, Dh]`` bias from ``[H*Dh]``).
      part: ``(index, count)``: take part ``index`` of ``count`` equal parts
        of the checkpoint's last axis (GPT-2's fused ``c_attn``).
    """

    path: PathTuple
    transpose: bool = False
    in_ndim: int | None = None
    part: tuple[int, int] | None = None

    def _flat_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        if self.in_ndim is None:
            return target
        if self.in_ndim == 0:
            return (math.prod(target),)
        return (math.prod(target[: self.in_ndim]), math.prod(target[self.in_ndim :]))

    def checkpoint_shape(self, target: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the checkpoint tensor must have for a param of shape ``target``."""
        shape = self._flat_shape(target)
        if self.transpose:
            shape = shape[::-1]
        if self.part:
            shape = (*shape[:-1], shape[-1] * self.part[1])
        return shape

    def convert(self, name: str, array: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
        """Checkpoint tensor ``name`` -> an array of shape ``target``; raises on a shape mismatch."""
        expected = self.checkpoint_shape(target)
        if tuple(array.shape) != expected:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(array.shape)}, but param "
                f"{path_str(self.path)!r} with shape {target} needs a checkpoint shape of {expected}; "
                "check that config.json belongs to these weights"
            )
        if self.part:
            index, count = self.part
            array = np.split(array, count, axis=-1)[index]
        if self.transpose:
            array = array.T
        return np.ascontiguousarray(array).reshape(target)


KeyMap = dict[str, tuple[Tensor, ...]]


def _linear(hf: str, path: PathTuple, in_ndim: int, transpose: bool = True) -> KeyMap:
    """``hf.weight``/``hf.bias`` -> ``path/kernel``/``path/bias``."""
    bias = Tensor((*path, "bias"), in_ndim=0)
    return {f"{hf}.weight": (Tensor((*path, "kernel"), transpose, in_ndim),), f"{hf}.bias": (bias,)}


def _norm(hf: str, path: PathTuple, bias: bool = True) -> KeyMap:
    out = {f"{hf}.weight": (Tensor((*path, "scale")),)}
    if bias:
        out[f"{hf}.bias"] = (Tensor((*path, "bias")),)
    return out


def _embed(hf: str, path: PathTuple) -> KeyMap:
    return {f"{hf}.weight": (Tensor((*path, "embedding")),)}


def bert_keys(config: BertConfig, pooler: bool = True) -> KeyMap:
    """Names in a ``BertModel`` checkpoint (``bert.`` prefix stripped)."""
    keys: KeyMap = {}
    for kind in ("word", "position", "token_type"):
        keys |= _embed(f"embeddings.{kind}_embeddings", ("embeddings", f"{kind}_embeddings"))
    keys |= _norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", ("encoder", unrolled_key(i))
        for proj in ("query", "key", "value"):
            keys |= _linear(f"{hf}.attention.self.{proj}", (*fx, "attention", proj), 1)
        keys |= _linear(f"{hf}.attention.output.dense", (*fx, "attention", "out"), 2)
        keys |= _norm(f"{hf}.attention.output.LayerNorm", (*fx, "attention_norm"))
        keys |= _linear(f"{hf}.intermediate.dense", (*fx, "mlp", "intermediate"), 1)
        keys |= _linear(f"{hf}.output.dense", (*fx, "mlp", "output"), 1)
        keys |= _norm(f"{hf}.output.LayerNorm", (*fx, "mlp_norm"))
    if pooler:
        keys |= _linear("pooler.dense", ("pooler",), 1)
    return keys


def bert_classifier_keys(config: BertConfig, pooler: bool = True) -> KeyMap:
    keys = {
        f"bert.{k}": tuple(dataclasses.replace(t, path=("bert", *t.path)) for t in v)
        for k, v in bert_keys(config, pooler).items()
    }
    return keys | _linear("classifier", ("classifier",), 1)


def gpt2_keys(config: GPT2Config) -> KeyMap:
    """Names in a ``GPT2LMHeadModel`` checkpoint (``transformer.`` prefix stripped)."""
    keys: KeyMap = {}
    keys |= _embed("wte", ("token_embeddings",))
    keys |= _embed("wpe", ("position_embeddings",))
    for i in range(config.n_layer):
        hf, fx = f"h.{i}", ("decoder", unrolled_key(i))
        keys |= _norm(f"{hf}.ln_1", (*fx, "attention_norm"))
        attn = (*fx, "attention")
        keys[f"{hf}.attn.c_attn.weight"] = tuple(
            Tensor((*attn, proj, "kernel"), in_ndim=1, part=(j, 3)) for j, proj in enumerate(("query", "key", "value"))
        )
        keys[f"{hf}.attn.c_attn.bias"] = tuple(
            Tensor((*attn, proj, "bias"), in_ndim=0, part=(j, 3)) for j, proj in enumerate(("query", "key", "value"))
        )
        keys[f"{hf}.attn.c_proj.weight"] = (Tensor((*attn, "out", "kernel"), in_ndim=2),)
        keys[f"{hf}.attn.c_proj.bias"] = (Tensor((*attn, "out", "bias")),)
        keys |= _norm(f"{hf}.ln_2", (*fx, "mlp_norm"))
        keys |= _linear(f"{hf}.mlp.c_fc", (*fx, "mlp", "fc"), 1, transpose=False)
        keys |= _linear(f"{hf}.mlp.c_proj", (*fx, "mlp", "proj"), 1, transpose=False)
    keys |= _norm("ln_f", ("final_norm",))
    return keys


def llama_keys(config: LlamaConfig) -> KeyMap:
    """Names in a ``LlamaForCausalLM`` checkpoint (``model.`` prefix stripped)."""
    keys: KeyMap = {}
    keys |= _embed("embed_tokens", ("token_embeddings",))
    for i in range(config.num_hidden_layers):
        hf, fx = f"layers.{i}", ("decoder", unrolled_key(i))
        attn = (*fx, "attention")
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
            keys |= _optional_bias(_linear(f"{hf}.self_attn.{proj}_proj", (*attn, name), 1), config.attention_bias)
        keys |= _optional_bias(_linear(f"{hf}.self_attn.o_proj", (*attn, "out"), 2), config.attention_bias)
        for proj in ("gate", "up", "down"):
            keys |= _optional_bias(_linear(f"{hf}.mlp.{proj}_proj", (*fx, "mlp", proj), 1), config.mlp_bias)
        keys |= _norm(f"{hf}.input_layernorm", (*fx, "attention_norm"), bias=False)
        keys |= _norm(f"{hf}.post_attention_layernorm", (*fx, "mlp_norm"), bias=False)
    keys |= _norm("norm", ("final_norm",), bias=False)
    if not config.tie_word_embeddings:
        keys["lm_head.weight"] = (Tensor(("lm_head", "kernel"), transpose=True, in_ndim=1),)
    return keys


def _optional_bias(keys: KeyMap, bias: bool) -> KeyMap:
    return keys if bias else {k: v for k, v in keys.items() if not k.endswith(".bias")}


# Buffers and tied copies that checkpoints may carry and the Flax models do not need.
IGNORED = {
    "bert": [r"(bert\.)?embeddings\.position_ids", r"cls\..*"],
    "gpt2": [r"h\.\d+\.attn\.(bias|masked_bias)", r"lm_head\.weight"],
    "llama": [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
}

PREFIXES = {"bert": "", "gpt2": "transformer.", "llama": "model."}


def key_map(config: ModelConfig, classifier: bool = False, pooler: bool = True) -> KeyMap:
    """All checkpoint names the model needs, with their destinations."""
    if isinstance(config, BertConfig):
        return bert_classifier_keys(config, pooler) if classifier else bert_keys(config, pooler)
    if isinstance(config, GPT2Config):
        return gpt2_keys(config)
    return llama_keys(config)


def normalize_name(name: str, model_type: str, classifier: bool = False) -> str:
    """Strip the base-model prefix so names match :func:`key_map` (``bert.`` only for a bare encoder)."""
    if model_type == "bert":
        if classifier and not name.startswith(("bert.", "classifier.")):
            return f"bert.{name}"
        if not classifier and name.startswith("bert."):
            return name[len("bert.") :]
        return name
    prefix = PREFIXES[model_type]
    return name[len(prefix) :] if name.startswith(prefix) else name


def is_ignored(name: str, config: ModelConfig) -> bool:
    """Whether ``name`` is a buffer or tied copy the model does not need."""
    if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return True
    return any(re.fullmatch(p, name) for p in IGNORED[config.model_type])


def hf_names(model: Any) -> dict[str, tuple[str, Tensor]]:
    """For a bundled model: unrolled param path -> (PyTorch tensor name, its :class:`Tensor` layout).

    The table :mod:`lora_jax.peft` needs to write and read Hugging Face PEFT adapters. Names carry the
    prefix of the PyTorch class (``bert.`` inside ``BertForSequenceClassification``, ``transformer.`` for
    GPT-2, ``model.`` for Llama).
    """
    from lora_jax.models.bert import BertForSequenceClassification, has_pooler

    config = model.config
    classifier = isinstance(model, BertForSequenceClassification)
    pooler = has_pooler(model)
    prefix = "" if isinstance(config, BertConfig) else PREFIXES[config.model_type]
    table = {}
    for name, tensors in key_map(config, classifier=classifier, pooler=pooler).items():
        for tensor in tensors:
            table[path_str(tensor.path)] = (prefix + name, tensor)
    return table
