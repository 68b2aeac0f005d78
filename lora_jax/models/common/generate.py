"""Greedy and sampled decoding with a KV cache, jitted with static shapes.

The prompt fills the cache in one pass; then ``jax.lax.fori_loop`` feeds one
token per step. Shapes depend only on the prompt length and ``max_new_tokens``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.factored import factored
from lora_jax.models.bundled import ARCHITECTURES
from lora_jax.models.common.config import ConfigError
from lora_jax.models.common.decoder import DecoderOutput
from lora_jax.models.common.layers import Cache, init_cache
from lora_jax.models.registry import Registry
from lora_jax.serve import AdapterSet, check_ids, gather_rows, per_example
from lora_jax.spec import LoraSpec
from lora_jax.typing import PyTree


def cache_for(model: nn.Module, batch: int, length: int, registry: Registry = ARCHITECTURES) -> Cache:
    """Return an empty KV cache for ``model``: ``{"key", "value"}`` each ``[layers, B, length, K, Dh]``.

    Raises:
      ConfigError: ``model``'s family has no KV cache (an encoder), or ``length`` exceeds its positions.
    """
    arch = registry.of(model)
    if arch.cache is None:
        raise ConfigError(f"generation needs a decoder; {type(model).__name__} ({arch.model_type}) has no KV cache")
    return init_cache(*arch.cache.shape(model.config, batch, length), model.dtype)


def choose(logits: jax.Array, key: jax.Array | None, temperature: float, top_k: int | None) -> jax.Array:
    """Return next tokens ``[B]`` from ``logits [B, V]``: argmax at temperature 0, else a sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    assert key is not None, "sampling needs a key"
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "spec",
        "per_row",
        "max_new_tokens",
        "temperature",
        "top_k",
        "eos_token_id",
        "pad_token_id",
    ),
)
def _generate(
    model: nn.Module,
    params: PyTree,
    lora: PyTree | tuple[AdapterSet, jax.Array] | None,
    spec: LoraSpec | None,
    per_row: bool,
    input_ids: jax.Array,
    prompt_mask: jax.Array,
    cache: Cache,
    key: jax.Array | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_token_id: int | None,
    pad_token_id: int,
) -> jax.Array:
    batch, prompt = input_ids.shape
    total = prompt + max_new_tokens
    run = _forward(model, spec, per_row)
    if per_row:  # each row's adapter, gathered once for the prompt and every step
        assert isinstance(lora, tuple)
        lora_set, adapter_ids = lora
        lora = gather_rows(params, lora_set, adapter_ids)
        cache = jax.tree_util.tree_map(_rows_first, cache)
    # Left padding: positions count real tokens only, and padded slots stay hidden.
    slot_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    prompt_positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    lengths = jnp.sum(prompt_mask, axis=1)
    out = run(
        params,
        lora,
        input_ids,
        slot_mask,
        cache=cache,
        cache_index=0,
        position_ids=prompt_positions,
    )
    tokens = jnp.full((batch, total), pad_token_id, jnp.int32).at[:, :prompt].set(input_ids)

    def emit(step: jax.Array, logits: jax.Array, tokens: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        step_key = None if key is None else jax.random.fold_in(key, step)
        nxt = choose(logits, step_key, temperature, top_k)
        if eos_token_id is not None:
            nxt = jnp.where(done, pad_token_id, nxt)
            done = done | (nxt == eos_token_id)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, prompt + step))
        return tokens, done

    def body(step: jax.Array, state: tuple) -> tuple:
        tokens, cache, logits, done = state
        tokens, done = emit(step, logits, tokens, done)
        nxt = jax.lax.dynamic_slice(tokens, (0, prompt + step), (batch, 1))
        out = run(
            params, lora, nxt, slot_mask, cache=cache, cache_index=prompt + step, position_ids=(lengths + step)[:, None]
        )
        return tokens, out.cache, out.logits[:, -1], done

    state = (tokens, out.cache, out.logits[:, -1], jnp.zeros((batch,), bool))
    tokens, _, logits, done = jax.lax.fori_loop(0, max_new_tokens - 1, body, state)
    tokens, _ = emit(jnp.int32(max_new_tokens - 1), logits, tokens, done)
    return tokens


def _rows_first(cache: jax.Array) -> jax.Array:
    """Swap a cache leaf's layer and row axes: ``[layers, B, ...]`` <-> ``[B, layers, ...]``."""
    return jnp.swapaxes(cache, 0, 1)


def _forward(model: nn.Module, spec: LoraSpec | None, per_row: bool = False) -> Callable[..., DecoderOutput]:
    """Return ``(params, lora, *inputs, **options) -> DecoderOutput``: plain, or factored with adapters.

    With ``per_row``, ``lora`` holds each row's adapter (:func:`lora_jax.serve.gather_rows` of a set whose
    spec is ``spec``) and each row runs with its own; the cache is laid out rows first, ``[B, layers, S, K, Dh]``
    (:func:`_rows_first`), so that running row by row moves no cache axis at each step.
    """

    def plain(params: PyTree, *inputs: Any, **options: Any) -> DecoderOutput:
        return model.apply({"params": params}, *inputs, **options)  # pyright: ignore[reportReturnType]

    if per_row:
        assert spec is not None

        def rows_first(params: PyTree, *inputs: Any, cache: Cache, **options: Any) -> DecoderOutput:
            cache = jax.tree_util.tree_map(_rows_first, cache)  # a batch of one: a free swap
            out = plain(params, *inputs, cache=cache, **options)
            return out._replace(cache=jax.tree_util.tree_map(_rows_first, out.cache))

        run = per_example(rows_first)
        return lambda params, rows, *inputs, **options: run.apply_rows(params, rows, spec, *inputs, **options)
    if spec is None:
        return lambda params, lora, *inputs, **options: plain(params, *inputs, **options)
    return factored(plain, spec)


def generate(
    model: nn.Module,
    params: PyTree,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    lora: PyTree | None = None,
    spec: LoraSpec | None = None,
    lora_set: AdapterSet | None = None,
    adapter_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    registry: Registry = ARCHITECTURES,
) -> jax.Array:
    """Continue ``input_ids`` by ``max_new_tokens`` tokens.

    Args:
      model: a decoder (:class:`GPT2LMHeadModel`, :class:`LlamaForCausalLM` or another registered one).
      params: its params: the base with ``lora`` and ``spec``, or a merged tree alone.
      input_ids: ``[B, P]`` prompts; shorter ones padded on the left.
      max_new_tokens: ``N``; the cache holds ``P + N`` positions.
      attention_mask: ``[B, P]``, 0 over left padding (default all 1).
      temperature: 0 picks the argmax (greedy); above 0 samples from
        ``softmax(logits / temperature)``, optionally among the ``top_k`` best.
      key: the RNG key for sampling; step ``i`` uses ``fold_in(key, i)``.
      eos_token_id: after it, a row emits ``pad_token_id``.
      lora, spec: adapters to run unmerged, through the factored path (``x W0 + s (x A) B``): no
        ``W0 + A @ B`` is formed at any step. Both or neither.
      lora_set, adapter_ids: a different adapter per row instead (:mod:`lora_jax.serve`): row ``i`` runs with
        the adapter in slot ``adapter_ids[i]`` of the set, or the base alone for -1, prompt and every step, as
        ``x W0 + s_i (x A_i) B_i``. Both or neither, and not with ``lora``. Swapping the set's adapters does not
        recompile.
      registry: the families; ``model``'s own gives the cache shape.

    Returns:
      ``[B, P + N]`` int32: the prompt followed by the new tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit RNG key")
    if (lora is None) != (spec is None):
        raise ValueError("give both lora and spec to generate with adapters, or neither")
    if (lora_set is None) != (adapter_ids is None):
        raise ValueError("give both lora_set and adapter_ids to generate with an adapter per row, or neither")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    lora_arg: PyTree | tuple[AdapterSet, jax.Array] | None = lora
    if lora_set is not None:
        if lora is not None:
            raise ValueError("give lora and spec (one adapter) or lora_set and adapter_ids (one per row), not both")
        check_ids(lora_set, adapter_ids)
        adapter_ids = jnp.asarray(adapter_ids)
        if adapter_ids.shape != input_ids.shape[:1]:
            raise ValueError(
                f"adapter_ids has shape {adapter_ids.shape}; give one id per prompt, shape ({input_ids.shape[0]},)"
            )
        lora_arg, spec = (lora_set, adapter_ids), lora_set.spec
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    cache = cache_for(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, registry)
    return _generate(
        model,
        params,
        lora_arg,
        spec,
        lora_set is not None,
        input_ids,
        mask,
        cache,
        key if temperature > 0 else None,
        max_new_tokens,
        float(temperature),
        top_k,
        eos_token_id,
        pad_token_id,
    )
