"""BERT encoder with Hugging Face ``BertModel`` semantics, and a classification head.

Param paths (unrolled; ``scan_layers=True`` puts ``encoder/layers/...`` with a
leading layer axis instead of ``encoder/layer_{i}/...``)::

    embeddings/{word,position,token_type}_embeddings/embedding   [V|P|types, D]
    embeddings/layer_norm/{scale,bias}                            [D]
    encoder/layer_{i}/attention/{query,key,value}/kernel          [D, H, Dh]
    encoder/layer_{i}/attention/out/kernel                        [H, Dh, D]
    encoder/layer_{i}/attention_norm/{scale,bias}                 [D]
    encoder/layer_{i}/mlp/intermediate/kernel                     [D, F]
    encoder/layer_{i}/mlp/output/kernel                           [F, D]
    encoder/layer_{i}/mlp_norm/{scale,bias}                       [D]
    pooler/kernel                                                 [D, D]

The classifier wraps this under ``bert/`` and adds ``classifier/{kernel,bias}``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.bert.config import BertConfig
from lora_jax.models.bert.pooling import POOLINGS, mean_pool
from lora_jax.models.common.config import ConfigError
from lora_jax.models.common.layers import Attention, Cache, Dtype, activation, layer_norm
from lora_jax.models.common.stacking import BlockStack


class BertOutput(NamedTuple):
    hidden_states: jax.Array  # [B, T, D]
    pooled: jax.Array | None  # [B, D]


class BertMLP(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        dense = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.Dense(self.config.intermediate_size, **dense, name="intermediate")(x)
        h = activation(self.config.hidden_act)(h)
        return nn.Dense(self.config.hidden_size, **dense, name="output")(h)


class BertLayer(nn.Module):
    """One post-LayerNorm encoder block."""

    config: BertConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cache: Cache | None, mask: jax.Array, positions: Any, cache_index: Any
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, T, D]``, ``mask [B, 1, 1, T]`` -> ``([B, T, D], None)``."""
        cfg = self.config
        norm = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn, _ = Attention(
            cfg.num_attention_heads,
            cfg.num_attention_heads,
            cfg.head_dim,
            dropout_rate=cfg.attention_probs_dropout_prob,
            deterministic=self.deterministic,
            **norm,
            name="attention",
        )(x, mask)
        attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=self.deterministic)
        x = layer_norm(cfg.layer_norm_eps, **norm, name="attention_norm")(x + attn)
        h = BertMLP(cfg, **norm, name="mlp")(x)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=self.deterministic)
        return layer_norm(cfg.layer_norm_eps, **norm, name="mlp_norm")(x + h), None


class BertEmbeddings(nn.Module):
    config: BertConfig
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        """Integer ``[B, T]`` each -> ``[B, T, D]``."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.initializers.normal(cfg.initializer_range)
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, **kw, name="word_embeddings")
        width = cfg.hidden_size
        pos = nn.Embed(cfg.max_position_embeddings, width, embedding_init=init, **kw, name="position_embeddings")
        types = nn.Embed(cfg.type_vocab_size, width, embedding_init=init, **kw, name="token_type_embeddings")
        x = word(input_ids) + types(token_type_ids) + pos(position_ids)
        x = layer_norm(cfg.layer_norm_eps, **kw, name="layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)


class BertModel(nn.Module):
    """BERT encoder; ``__call__`` returns :class:`BertOutput` (hidden states and pooled ``[CLS]``)."""

    config: BertConfig
    add_pooler: bool = True
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str | None = None  # a policy of lora_jax.models.REMAT_POLICIES: recompute blocks in the backward pass

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> BertOutput:
        """Encode a batch.

        Args:
          input_ids: ``[B, T]`` token ids.
          attention_mask: ``[B, T]``, 1 for tokens, 0 for padding (default all 1).
          token_type_ids: ``[B, T]`` segment ids (default 0).
          position_ids: ``[B, T]`` (default ``0..T-1``).
          deterministic: False turns dropout on (needs a ``"dropout"`` RNG).
        """
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x = BertEmbeddings(cfg, deterministic, **kw, name="embeddings")(input_ids, token_type_ids, position_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]
        layers = cfg.num_hidden_layers
        encoder = BlockStack(
            BertLayer, cfg, layers, self.scan_layers, deterministic, **kw, remat=self.remat, name="encoder"
        )
        x, _ = encoder(x, mask)
        pooled = None
        if self.add_pooler:
            pooled = jnp.tanh(nn.Dense(cfg.hidden_size, **kw, name="pooler")(x[:, 0]))
        return BertOutput(x, pooled)


class BertForSequenceClassification(nn.Module):
    """Pooled sentence -> dropout -> ``Dense(num_labels)``; returns logits ``[B, num_labels]``.

    ``pooling="cls"`` is Hugging Face's head (tanh ``pooler`` over ``[CLS]``); ``"mean"`` averages the
    final hidden states over real tokens, the pooling sentence-transformers models are trained with,
    and has no ``pooler`` params.
    """

    config: BertConfig
    pooling: str = "cls"
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str | None = None  # a policy of lora_jax.models.REMAT_POLICIES: recompute blocks in the backward pass

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Arguments as :meth:`BertModel.__call__`; returns ``[B, num_labels]``."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        cls = self.pooling == "cls"
        bert = BertModel(cfg, cls, self.scan_layers, **kw, remat=self.remat, name="bert")
        out = bert(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        if cls:
            pooled = out.pooled
        else:
            mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
            pooled = mean_pool(out.hidden_states, mask).astype(out.hidden_states.dtype)
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
        init = nn.initializers.normal(cfg.initializer_range)
        return nn.Dense(cfg.num_labels, kernel_init=init, **kw, name="classifier")(pooled)


def classifier_apply_fn(model: BertForSequenceClassification) -> Any:
    """``(params, batch, rng) -> logits [B, num_labels]`` for :mod:`lora_jax.training.objectives`.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``token_type_ids`` ``[B, T]``; dropout is on
    when ``rng`` is a key and off when it is ``None``.
    """

    def apply_fn(params: Any, batch: dict, rng: jax.Array | None) -> jax.Array:
        return model.apply(  # pyright: ignore[reportReturnType]  (apply returns the module's output)
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )

    return apply_fn
