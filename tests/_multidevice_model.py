"""A tiny transformer-like Flax model for the sharding tests, unrolled or scanned.

Param names follow the usual layout: ``embed/embedding [V, D]``,
``layer_i/{query,key,value}/kernel [D, H, Dh]``, ``layer_i/out/kernel [H, Dh, D]``,
``layer_i/mlp/{up,down}/kernel``; the scanned variant has ``layers/...`` with a
leading layer axis. Imported by path (not as a package) from the tests.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import LoraSpec, Rule, trainable
from lora_jax import distributed as dist
from lora_jax.training import TrainStep, train_step

VOCAB, WIDTH, HEADS, HEAD_DIM, FF, LAYERS, SEQ, BATCH = 32, 16, 4, 4, 32, 2, 4, 8


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        """``x [B, T, D] -> [B, T, D]``."""
        h = nn.LayerNorm(name="ln")(x)
        q, k, v = (nn.DenseGeneral((HEADS, HEAD_DIM), name=n)(h) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / HEAD_DIM**0.5, axis=-1)
        mixed = jnp.einsum("bhts,bshd->bthd", weights, v)
        x = x + nn.DenseGeneral(WIDTH, axis=(-2, -1), name="out")(mixed)
        h = nn.relu(nn.Dense(FF, name="up")(x))
        return x + nn.Dense(WIDTH, name="down")(h), None


class TinyLM(nn.Module):
    scanned: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, T] int -> logits [B, T, V]``."""
        x = nn.Embed(VOCAB, WIDTH, name="embed")(tokens)
        if self.scanned:
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(LAYERS):
                x, _ = Block(name=f"layer_{i}")(x)
        return nn.Dense(VOCAB, name="head")(x)


def stack_layers(params: dict) -> dict:
    """Unrolled ``layer_i`` subtrees -> one ``layers`` subtree with a leading layer axis."""
    layers = [params[f"layer_{i}"] for i in range(LAYERS)]
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return out


def lora_spec(scanned: bool) -> LoraSpec:
    """LoRA on q/k/v/out and the MLP, plus a fully trainable head."""
    stack = (0,) if scanned else None
    lead = 1 if scanned else 0
    return LoraSpec(
        [
            Rule(r".*/(query|value|key)/kernel", rank=2, in_axes=(lead,), stack_axes=stack),
            Rule(r".*/out/kernel", rank=2, out_axes=(-1,), stack_axes=stack),
            Rule(r".*/(up|down)/kernel", rank=2, stack_axes=stack),
            trainable(r"head/.*"),
        ]
    )


def tp_table(axis: str = "model") -> list[dist.PartitionRule]:
    """Tensor-parallel rules for this model: heads for attention, columns/rows for the MLP."""
    return [
        (r".*/(query|key|value)/(kernel|bias)", dist.column_parallel(axis, out_ndim=2)),
        (r".*/out/kernel", dist.row_parallel(axis, in_ndim=2)),
        (r".*/up/(kernel|bias)", dist.column_parallel(axis)),
        (r".*/down/kernel", dist.row_parallel(axis)),
    ]


def base_rules(mesh_names: tuple[str, ...], scanned: bool) -> list[dist.PartitionRule]:
    """FSDP over ``data`` on a 1-D mesh; FSDP over ``data`` plus TP over ``model`` on a 2-D one."""
    stacked = r"layers/.*" if scanned else None
    if mesh_names == ("data",):
        return dist.fsdp_rules("data", stacked=stacked)
    return dist.fsdp_tp_rules("data", "model", tp=tp_table("model"), stacked=stacked)


def make_params(scanned: bool, seed: int = 0) -> dict:
    """Base params; the scanned ones are the unrolled ones stacked, so both models agree."""
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    # One compiled init is much faster than flax's op-by-op eager init on CPU.
    params = jax.jit(TinyLM(scanned=False).init)(jax.random.key(seed), tokens)["params"]
    return stack_layers(params) if scanned else params


def make_batch(seed: int = 1, batch: int = BATCH) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, VOCAB, (batch, SEQ)).astype(np.int32),
        "targets": rng.integers(0, VOCAB, (batch, SEQ)).astype(np.int32),
    }


def loss_fn(scanned: bool):
    model = TinyLM(scanned=scanned)

    def loss(params: dict, batch: dict, rng: jax.Array | None) -> jax.Array:
        del rng  # no dropout
        logits = model.apply({"params": params}, batch["tokens"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    return loss


def make_tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2, weight_decay=0.01)


def make_step(scanned: bool, tx: optax.GradientTransformation, *, factored: bool = False, **options) -> TrainStep:
    """The train step of this model, unjitted; through ``combine`` unless ``factored``."""
    return train_step(loss_fn(scanned), lora_spec(scanned), tx, factored=factored, **options)
