"""One registry entry per model family: everything the library needs to know about it, as data.

An :class:`Architecture` says how to build a family's modules from a ``config.json``, how its
checkpoint names map to param paths, which kernels the LoRA presets adapt, how its linear maps
split under tensor parallelism and what its KV cache looks like. A :class:`Registry` holds
several and looks them up by Hugging Face architecture name, by ``model_type`` or by module.

The bundled families (BERT, GPT-2, Llama) are ``lora_jax.models.ARCHITECTURES``. A new family
needs no library edit: define its entry and pass ``registry=ARCHITECTURES.add(entry)`` to
:func:`~lora_jax.models.from_pretrained`, :func:`~lora_jax.models.lora_spec`,
:func:`~lora_jax.models.generate` and the other lookups (a registry is a value, so nothing global
changes and nothing needs undoing).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from lora_jax.models.common.config import ConfigError

if TYPE_CHECKING:
    from lora_jax.models.common.convert import KeyMap


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear map inside a block: a LoRA preset target and a tensor-parallel unit.

    Attributes:
      name: its preset name, e.g. ``"q"`` or ``"up"``.
      path: its module path inside one block, e.g. ``"attention/query"`` (the kernel is ``path/kernel``).
      in_axes: how many leading axes of the unrolled kernel are inputs (2 for ``[H, Dh, D]``).
      out_axes: how many trailing axes are outputs (2 for ``[D, H, Dh]``).
      parallel: ``"column"`` splits the first output axis (the heads of ``[D, H, Dh]``), ``"row"``
        splits the first input axis (the heads of ``[H, Dh, D]``). A fused kernel's slice axis is
        never split; the axis after it is (the heads of ``[D, 3, H, Dh]``).
      slices: for a fused kernel, the preset names of the maps it holds side by side along its first
        output axis (``("q", "k", "v")``); the presets adapt those named as its slices (``Rule.slices``).
      flag: a boolean config field; the map exists only in a model whose config sets it, and then the
        maps named in ``slices`` do not (GPT-2's ``fused_qkv``).
    """

    name: str
    path: str
    in_axes: int = 1
    out_axes: int = 1
    parallel: Literal["column", "row"] = "column"
    slices: tuple[str, ...] = ()
    flag: str | None = None

    @property
    def split_axes(self) -> int:
        """Return how many axes the split side spans: ``out_axes`` (column) or ``in_axes`` (row); 2 means heads."""
        if self.parallel == "column":
            return self.out_axes - (1 if self.slices else 0)
        return self.in_axes


@dataclasses.dataclass(frozen=True)
class KVCache:
    """A decoder's KV cache shape, as the names of the config fields that give it.

    Attributes:
      layers, kv_heads, head_dim: config fields for ``[layers, B, S, K, Dh]``.
      max_positions: the config field that caps ``S`` (learned positions), or None for no cap.
    """

    layers: str
    kv_heads: str
    head_dim: str
    max_positions: str | None = None

    def shape(self, config: Any, batch: int, length: int) -> tuple[int, int, int, int, int]:
        """Return the cache shape ``(layers, B, length, K, Dh)`` for ``config``.

        Raises:
          ConfigError: ``length`` exceeds the config's position cap.
        """
        if self.max_positions is not None:
            limit = getattr(config, self.max_positions)
            if length > limit:
                raise ConfigError(
                    f"{length} tokens exceed {type(config).__name__}.{self.max_positions} = {limit}; "
                    "generate fewer tokens or shorten the prompt"
                )
        return (
            getattr(config, self.layers),
            batch,
            length,
            getattr(config, self.kv_heads),
            getattr(config, self.head_dim),
        )


@dataclasses.dataclass(frozen=True)
class Build:
    """One Hugging Face architecture name of a family and the module it builds.

    Attributes:
      name: as in ``config.json``'s ``architectures``, e.g. ``"BertForSequenceClassification"``.
      module: ``module(config, scan_layers=, dtype=, param_dtype=, **options)``, called as
        ``module.apply(variables, input_ids [B, T], ...)``.
      options: the keyword options a caller may set: fields of the config (``num_labels``,
        applied with ``dataclasses.replace``) or of the module (``pooling``, ``add_pooler``).
      detect: option values read off the checkpoint's tensor names, e.g. whether it has a pooler;
        a caller's own values win.
    """

    name: str
    module: type
    options: tuple[str, ...] = ()
    detect: Callable[[Sequence[str]], dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model family: its config, modules, checkpoint names, LoRA targets, parallel layout and cache.

    Attributes:
      model_type: ``config.json``'s ``model_type``, e.g. ``"llama"``.
      config: the config class; ``config.from_hf(values)`` reads a ``config.json`` dict.
      builds: the architecture names it builds; the first is the default for ``model_type``.
      key_map: ``key_map(module)`` -> checkpoint tensor name -> where its parts go
        (:class:`~lora_jax.models.common.convert.Tensor`, unrolled paths). Names are spelled as the
        PyTorch class of ``module`` saves them; an empty tuple marks a tensor that is known and unused.
      stack: the key of the block stack (``"encoder"``, ``"decoder"``).
      linears: the block's linear maps (presets: ``q k v o`` and the MLP's; tensor-parallel rules).
      prefix: the base model's prefix in checkpoint names (``"transformer."``); a checkpoint may
        spell names with or without it.
      ignored: regexes of buffers and copies the modules do not need, matched in full against a
        checkpoint name with ``prefix`` removed.
      head: the top-level param key of a task head (``"classifier"``): ``lora_spec(head=True)`` makes
        it trainable, and loading draws it ``N(0, config.initializer_range^2)`` when the checkpoint lacks it.
      cache: the KV cache of a decoder; None for an encoder.
    """

    model_type: str
    config: type
    builds: tuple[Build, ...]
    key_map: Callable[[Any], KeyMap]
    stack: str
    linears: tuple[Linear, ...]
    prefix: str = ""
    ignored: tuple[str, ...] = ()
    head: str | None = None
    cache: KVCache | None = None

    def build(self, name: str) -> Build:
        """Return the build called ``name``; KeyError if the family has none."""
        for build in self.builds:
            if build.name == name:
                return build
        raise KeyError(name)

    def linear(self, name: str) -> Linear:
        """Return the linear map whose preset name is ``name``; KeyError if none."""
        for linear in self.linears:
            if linear.name == name:
                return linear
        raise KeyError(name)

    def linears_for(self, config: Any) -> tuple[Linear, ...]:
        """Return the linear maps a model of ``config`` has.

        A map with a ``flag`` is there when the config sets that flag, and then the maps named in its
        ``slices`` are not (GPT-2's fused ``qkv`` in place of ``q``, ``k`` and ``v``).
        """
        present = [linear for linear in self.linears if linear.flag is None or getattr(config, linear.flag, False)]
        fused = {name for linear in present for name in linear.slices}
        return tuple(linear for linear in present if linear.name not in fused)

    def is_ignored(self, name: str) -> bool:
        """Return whether checkpoint tensor ``name`` is a buffer or copy the modules do not need."""
        bare = name[len(self.prefix) :] if self.prefix and name.startswith(self.prefix) else name
        return any(re.fullmatch(pattern, bare) for pattern in self.ignored)

    def column_parallel(self) -> tuple[tuple[str, int], ...]:
        """Return ``(path inside a block, output axes)`` of the column-parallel linear maps."""
        return tuple((lin.path, lin.split_axes) for lin in self.linears if lin.parallel == "column")

    def row_parallel(self) -> tuple[tuple[str, int], ...]:
        """Return ``(path inside a block, input axes)`` of the row-parallel linear maps."""
        return tuple((lin.path, lin.split_axes) for lin in self.linears if lin.parallel == "row")


class Registry(Mapping[str, Architecture]):
    """Architectures by Hugging Face architecture name (``registry["LlamaForCausalLM"]``).

    Immutable: :meth:`add` returns a new registry. Model types, config classes, module classes
    and architecture names must be unique.
    """

    def __init__(self, architectures: Iterable[Architecture] = ()) -> None:
        self._architectures: tuple[Architecture, ...] = tuple(architectures)
        self._by_name: dict[str, Architecture] = {}
        self._by_type: dict[str, Architecture] = {}
        for arch in self._architectures:
            if arch.model_type in self._by_type:
                raise ConfigError(f"model_type {arch.model_type!r} is registered twice")
            self._by_type[arch.model_type] = arch
            for build in arch.builds:
                if build.name in self._by_name:
                    raise ConfigError(f"architecture {build.name!r} is registered twice")
                self._by_name[build.name] = arch

    def __getitem__(self, name: str) -> Architecture:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Registry({', '.join(self._by_type)})"

    @property
    def architectures(self) -> tuple[Architecture, ...]:
        """Return the registered families, in order."""
        return self._architectures

    def add(self, *architectures: Architecture) -> Registry:
        """Return a new registry with ``architectures`` after these."""
        return Registry((*self._architectures, *architectures))

    def by_type(self, model_type: str) -> Architecture:
        """Return the family of ``model_type``.

        Raises:
          ConfigError: none is registered, with the registered types.
        """
        if model_type not in self._by_type:
            raise ConfigError(f"no architecture has model_type {model_type!r}; registered: {', '.join(self._by_type)}")
        return self._by_type[model_type]

    def of(self, model_or_config: Any) -> Architecture:
        """Return the family that builds this module (or whose config class this config is).

        Raises:
          ConfigError: no registered family builds it; register one with :meth:`add`.
        """
        module_type = type(model_or_config)
        config_type = type(getattr(model_or_config, "config", model_or_config))
        for arch in self._architectures:
            if any(build.module is module_type for build in arch.builds):
                return arch
        for arch in self._architectures:
            if arch.config is config_type:
                return arch
        raise ConfigError(
            f"no registered architecture builds {module_type.__name__} or uses {config_type.__name__}; "
            f"registered: {', '.join(self._by_type)} (pass registry=ARCHITECTURES.add(...) for another family)"
        )

    def choose(self, values: Mapping[str, Any], architecture: str | None = None) -> str:
        """Return the architecture name to build for a ``config.json`` dict.

        ``architecture`` overrides the file (e.g. ``"BertForSequenceClassification"`` on a plain
        encoder). An unlisted head of a known ``model_type`` falls back to that type's first build,
        with a warning.

        Raises:
          ConfigError: the name or the file's architectures and model type are not registered.
        """
        supported = ", ".join(self._by_name)
        if architecture is not None:
            if architecture not in self._by_name:
                raise ConfigError(f"unknown architecture {architecture!r}; supported: {supported}")
            return architecture
        listed = values.get("architectures") or []
        for name in listed:
            if name in self._by_name:
                return name
        model_type = values.get("model_type")
        if model_type in self._by_type:
            fallback = self._by_type[model_type].builds[0].name
            if listed:
                warnings.warn(f"architecture {listed[0]!r} is not supported; loading {fallback}", stacklevel=3)
            return fallback
        raise ConfigError(f"unknown architecture {listed or None} (model_type {model_type!r}); supported: {supported}")
