"""PiSSA (Meng et al. 2024): adapters from the principal singular vectors of the base, and back to plain LoRA.

:func:`pissa_init` splits each adapted kernel ``W0`` into its top-``r`` principal part, which becomes the
adapter, and the residual ``W0 - s * A @ B``, which replaces the frozen base; the adapted model equals the base
at step 0, and training moves the principal directions. With the kernel laid out as a matrix
``M [*stack, in, out]`` (its layout's input axes as rows, output axes as columns) and ``M = U S Vh``::

    A = U[:, :r] * sqrt(S[:r] / s)       [*stack, *in, r]
    B = sqrt(S[:r] / s) * Vh[:r]         [*stack, r, *out]

so ``s * A @ B = U_r S_r Vh_r`` (PEFT's ``init_lora_weights="pissa"``, transposed to ``[in, out]``).

A trained PiSSA adapter applies to the residual, which no other model has. :func:`pissa_to_lora` rewrites it as a
plain LoRA delta against the original ``W0`` (PEFT's pissa-to-lora): ``W_res + s A B = W0 + s (A B - A0 B0)``, so
``A' = [A | A0]`` and ``B' = [B ; -B0]`` of rank ``2r`` at the same scale (alpha doubled, or times ``sqrt(2)``
under rsLoRA). That adapter merges onto, and exports against, the original base.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lora_jax.adapters import check_fits
from lora_jax.errors import LoraError
from lora_jax.initializers import path_key
from lora_jax.paths import flatten, nested_set
from lora_jax.plan import Target, plan
from lora_jax.spec import ADAPTED_MODES, LoraSpec, Rule
from lora_jax.typing import PyTree
from lora_jax.variants import A_KEY, B_KEY, variant_of


def principal_factors(target: Target, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return PiSSA's ``A [*stack, *in, r]`` and ``B [*stack, r, *out]`` for one kernel, in float32.

    ``s * layout.delta(A, B)`` is the kernel's best rank-``r`` approximation (per stacked layer).
    """
    layout = target.layout
    assert layout is not None
    rank, scale = target.rule.rank, target.rule.scale
    matrix = jnp.transpose(jnp.asarray(kernel, jnp.float32), (*layout.stack, *layout.inputs, *layout.outputs))
    matrix = matrix.reshape(*layout.stack_shape, layout.in_size, layout.out_size)
    u, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    a = u[..., :, :rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., :rank, :]
    return a.reshape(target.a_shape), b.reshape(target.b_shape)


def pissa_init(params: PyTree, spec: LoraSpec) -> tuple[PyTree, dict]:
    """Split each adapted kernel into PiSSA's adapter and the frozen residual that replaces it.

    Every ``"lora"`` and ``"dora"`` target starts from its principal part (the rules' ``init`` and ``init_std``
    are not used); a DoRA magnitude starts at the column norm of ``W_res + s A @ B``, and fully trainable leaves
    at their base values, as :func:`lora_jax.init` gives them. Jittable (``spec`` static).

    Args:
      params: the base tree (arrays).
      spec: the rules; kernels of any layout (``nn.scan`` stacks are split layer by layer).

    Returns:
      ``(residual, lora)``: ``residual`` has ``params``' structure and dtypes, each adapted kernel replaced by
      ``W0 - s * A @ B`` (computed in float32, cast once); ``lora`` is the adapter tree, so that
      ``combine(residual, lora, spec)`` (and the factored path on ``residual``) equals ``params`` to rounding.

    Raises:
      SpecError: as :func:`lora_jax.plan`.
      LoraError: the spec adapts no kernel.
    """
    targets = plan(params, spec)
    if not any(t.layout is not None for t in targets):
        raise LoraError("pissa_init: the spec adapts no kernel; PiSSA needs at least one mode='lora' rule")
    flat, treedef = flatten(params)
    leaves = [leaf for _, leaf in flat]
    index = {path: i for i, (path, _) in enumerate(flat)}
    lora: dict = {}
    key = jax.random.key(0)  # the variants' init wants one; PiSSA's factors and DoRA's magnitude use none
    for target in targets:
        i = index[target.path]
        base = jnp.asarray(leaves[i])
        if target.layout is None:
            fresh = variant_of(target).init(key, target, base)
        else:
            dtype = jnp.dtype(target.rule.dtype)
            a, b = (factor.astype(dtype) for factor in principal_factors(target, base))
            # The residual takes away what the stored factors add back (in a bfloat16 rule too).
            principal = target.rule.scale * target.layout.delta(a, b)
            leaves[i] = (base.astype(jnp.float32) - principal).astype(base.dtype)
            # The variant makes its other leaves (DoRA's magnitude) for the weight the model starts from.
            start = leaves[i].astype(jnp.float32) + principal
            fresh = variant_of(target).init(path_key(key, target.name), target, start)
            fresh[(*target.path, A_KEY)], fresh[(*target.path, B_KEY)] = a, b
        for path, value in fresh.items():
            nested_set(lora, path, value)
    return jax.tree_util.tree_unflatten(treedef, leaves), lora


def lora_rule(rule: Rule) -> Rule:
    """Return the rule of a converted PiSSA adapter: rank ``2r`` at the same scale.

    Alpha doubles (standard scaling, ``2 alpha / 2r``) or grows by ``sqrt(2)`` (rsLoRA, ``alpha / sqrt(r)``),
    as PEFT writes the converted config.
    """
    if rule.mode not in ADAPTED_MODES:
        return rule
    alpha = rule.alpha * (math.sqrt(2.0) if rule.scaling == "rslora" else 2.0)
    return dataclasses.replace(rule, rank=2 * rule.rank, alpha=alpha)


def pissa_to_lora(params: PyTree, lora: PyTree, spec: LoraSpec, initial: PyTree) -> tuple[dict, LoraSpec]:
    """Rewrite a trained PiSSA adapter as a plain LoRA adapter against the original base (PEFT's pissa-to-lora).

    Args:
      params: the base tree, original or residual (only shapes are read).
      lora: the trained adapter tree.
      spec: the spec both adapters were made with.
      initial: the adapter tree :func:`pissa_init` returned, before training.

    Returns:
      ``(lora, spec)``: ``A' = [A | A0] [*stack, *in, 2r]`` and ``B' = [B ; -B0] [*stack, 2r, *out]`` at each
      adapted kernel, fully trainable leaves as trained, and the spec with each adapted rule at rank ``2r`` and
      the same scale (:func:`lora_rule`), so that ``merge(params, lora', spec')`` on the original base equals
      ``merge(residual, lora, spec)``. It exports with :func:`lora_jax.io.save_peft` as plain LoRA.

    Raises:
      AdapterMismatchError: ``lora`` or ``initial`` does not fit ``params`` and ``spec`` (names the leaf).
      LoraError: a DoRA rule (its update is not a sum, so no LoRA delta carries it).
      SpecError: ``2r`` exceeds a kernel's ``min(in, out)`` (as :func:`lora_jax.plan` names it).
    """
    targets = plan(params, spec)
    dora = [t.name for t in targets if t.rule.mode == "dora"]
    if dora:
        raise LoraError(
            f"pissa_to_lora: {dora[0]} is DoRA, whose m * W / ||W|| is no sum of the base and a delta, so no "
            "LoRA adapter against the original base carries it; keep the residual base, or merge it"
        )
    trained = check_fits(targets, lora)
    start = check_fits(targets, initial)
    converted_spec = LoraSpec([lora_rule(rule) for rule in spec.rules])
    converted: dict = {}
    for target in targets:
        if target.layout is None:
            nested_set(converted, target.path, trained[target.path])
            continue
        a_key, b_key = (*target.path, A_KEY), (*target.path, B_KEY)
        dtype = jnp.dtype(target.rule.dtype)
        stack = len(target.layout.stack)
        a = jnp.concatenate([jnp.asarray(trained[a_key]), jnp.asarray(start[a_key])], axis=-1)
        b = jnp.concatenate([jnp.asarray(trained[b_key]), -jnp.asarray(start[b_key])], axis=stack)
        nested_set(converted, a_key, a.astype(dtype))
        nested_set(converted, b_key, b.astype(dtype))
    check_fits(plan(params, converted_spec), converted)
    return converted, converted_spec
