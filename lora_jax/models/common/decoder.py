"""One causal language model for every decoder family, with two hooks for what differs.

A family fills in:

1. its block (:class:`DecoderBlock` hooks ``norm``, ``attention``, ``mlp``, ``residual_dropout``):
   the norm, attention and MLP kinds of a pre-norm block, also used for the final norm;
2. its ends (:class:`CausalLM` hooks ``embed``, ``head`` and ``head_kernel``): token and position
   embeddings, and the LM head (tied to the token embedding or its own ``lm_head``), whose kernel
   ``head_kernel`` reads from a param tree for a loss that applies it in chunks.

Param paths (unrolled; ``scan_layers=True`` gives ``decoder/layers/...`` with a leading layer axis)::

    token_embeddings/embedding                 [V, D]       (and whatever else ``embed`` adds)
    decoder/layer_{i}/attention_norm/...       [D]
    decoder/layer_{i}/attention/...            see :class:`~lora_jax.models.common.layers.Attention`
    decoder/layer_{i}/mlp_norm/...             [D]
    decoder/layer_{i}/mlp/...                  the family's MLP
    final_norm/...                             [D]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.common.layers import Cache, Dtype, causal_mask
from lora_jax.models.common.stacking import BlockStack


class DecoderOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    cache: Cache | None  # {"key", "value"} each [layers, B, S, K, Dh]


class DecoderHidden(NamedTuple):
    """What :class:`CausalLM` returns with ``head=False``: the head's input instead of its output."""

    hidden: jax.Array  # [B, T, D], the final norm's output
    cache: Cache | None


def positions_and_mask(
    length: int,
    cache: Cache | None,
    cache_index: jax.Array | int,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Return query positions ``[B|1, T]`` and the causal mask ``[B|1, 1, T, S]``.

    Without a cache the keys are the ``T`` new tokens; with one they are the
    ``S`` cache slots, of which those after the query's slot are hidden.
    ``attention_mask`` (``[B, T]`` or ``[B, S]``, 1 for real tokens) hides
    padding; ``position_ids`` (``[B, T]``) override the slot numbers as
    positions, e.g. to count from a row's first real token under left padding.
    """
    slots = jnp.arange(length) + cache_index
    keys = length if cache is None else cache["key"].shape[2]
    positions = slots[None] if position_ids is None else position_ids
    return positions, causal_mask(slots, keys, attention_mask)


class DecoderBlock(nn.Module):
    """A pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``, each with residual dropout.

    A family subclasses it and implements the hooks; :class:`BlockStack` builds it as
    ``block(config, deterministic=, dtype=, param_dtype=)``.
    """

    config: Any
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @staticmethod
    def norm(config: Any, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
        """Hook: the family's norm ``[..., D] -> [..., D]`` called ``name`` (also the model's final norm)."""
        raise NotImplementedError

    def attention(self) -> nn.Module:
        """Hook: the attention module named ``"attention"``, as :class:`~lora_jax.models.common.layers.Attention`."""
        raise NotImplementedError

    def mlp(self) -> nn.Module:
        """Hook: the MLP, named ``"mlp"``: ``[B, T, D] -> [B, T, D]``."""
        raise NotImplementedError

    def residual_dropout(self) -> float:
        """Hook: the dropout rate on each branch before its residual add (0 for none)."""
        return 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, cache: Cache | None, mask: jax.Array, positions: jax.Array, cache_index: Any
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, T, D]``, cache leaves ``[B, S, K, Dh]`` -> ``([B, T, D], cache)``."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        dropout = nn.Dropout(self.residual_dropout())
        h = self.norm(self.config, **kw, name="attention_norm")(x)
        h, cache = self.attention()(h, mask, positions, cache, cache_index)
        x = x + dropout(h, deterministic=self.deterministic)
        h = self.norm(self.config, **kw, name="mlp_norm")(x)
        return x + dropout(self.mlp()(h), deterministic=self.deterministic), cache


class CausalLM(nn.Module):
    """A decoder-only language model; returns :class:`DecoderOutput` with float32 logits.

    A family subclasses it, sets ``block`` (a :class:`DecoderBlock`) and implements ``embed`` and
    ``head``. The config needs ``num_hidden_layers``.
    """

    config: Any
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str | None = None  # a policy of lora_jax.models.REMAT_POLICIES: recompute blocks in the backward pass

    block: ClassVar[type[DecoderBlock]]

    def embed(self, input_ids: jax.Array, positions: jax.Array, deterministic: bool) -> tuple[jax.Array, nn.Embed]:
        """Hook: embed ``input_ids [B, T]`` at ``positions [B|1, T]`` -> ``([B, T, D], the token embedding)``."""
        raise NotImplementedError

    def head(self, x: jax.Array, tokens: nn.Embed) -> jax.Array:
        """Hook: final hidden states ``[B, T, D]`` -> logits ``[B, T, V]`` (``tokens.attend`` when tied)."""
        raise NotImplementedError

    def head_kernel(self, params: Any) -> jax.Array:
        """Hook: the kernel ``head`` multiplies by, ``[D, V]``, read from ``params`` (an unbound call).

        ``hidden @ head_kernel(params)`` in the model's dtype, cast to float32, is the logits; a loss can
        then form them a few positions at a time (:func:`lora_jax.training.chunked_next_token_nll`).
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not say where its LM head's kernel is: implement head_kernel(params) -> "
            "[D, V], or train with the whole logits (causal_lm_apply_fn(model), no chunk)"
        )

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
        head: bool = True,
    ) -> DecoderOutput | DecoderHidden:
        """Next-token logits.

        Args:
          input_ids: ``[B, T]``.
          attention_mask: ``[B, T]`` (or ``[B, S]`` with a cache), 1 for real tokens.
          cache: from :func:`lora_jax.models.init_cache`; the new keys go to
            slots ``cache_index .. cache_index + T - 1``.
          cache_index: position of ``input_ids[:, 0]``.
          deterministic: False turns dropout on (needs a ``"dropout"`` RNG).
          position_ids: ``[B, T]`` positions (default: the cache slots,
            ``cache_index .. cache_index + T - 1``).
          head: False skips the LM head and returns :class:`DecoderHidden`, for a loss that forms
            the logits from the hidden states and :meth:`head_kernel` a chunk at a time.

        Returns:
          logits ``[B, T, V]`` and the updated cache (None without one).
        """
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        positions, mask = positions_and_mask(input_ids.shape[1], cache, cache_index, attention_mask, position_ids)
        x, tokens = self.embed(input_ids, positions, deterministic)
        layers = cfg.num_hidden_layers
        decoder = BlockStack(
            self.block, cfg, layers, self.scan_layers, deterministic, **kw, remat=self.remat, name="decoder"
        )
        x, cache = decoder(x, mask, positions, cache, cache_index)
        x = self.block.norm(cfg, **kw, name="final_norm")(x)
        if not head:
            return DecoderHidden(x, cache)
        return DecoderOutput(self.head(x, tokens).astype(jnp.float32), cache)


def causal_lm_apply_fn(model: CausalLM, head: bool = True) -> Callable[..., Any]:
    """``(params, batch, rng) -> logits [B, T, V]`` for :func:`lora_jax.training.causal_lm`.

    ``batch`` holds ``input_ids`` and may hold ``attention_mask`` ``[B, T]``; dropout is on when ``rng``
    is a key and off when it is ``None``. ``head=False`` returns ``(hidden [B, T, D], head_kernel [D, V])``
    instead, for ``causal_lm(apply_fn, chunk=...)``, which never forms the whole logits.
    """

    def apply_fn(params: Any, batch: Any, rng: jax.Array | None) -> Any:
        out: Any = model.apply(  # the module's output: DecoderOutput, or DecoderHidden without the head
            {"params": params},
            batch["input_ids"],
            batch.get("attention_mask"),
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
            head=head,
        )
        return out.logits if head else (out.hidden, model.head_kernel(params))

    return apply_fn
