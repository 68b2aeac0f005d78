"""PEFT's ``adapter_config.json`` for LoRA: read and check it, and answer its questions the way PEFT does.

PEFT asks each module by its name in ``named_modules()`` (``bert.encoder.layer.1.attention.self.value``):

- Is it adapted? ``target_modules`` as a list selects a name equal to an entry or ending in ``"." + entry``
  (then ``layers_to_transform`` keeps only the listed layer indices); as a string, a regular expression that
  must match the whole name. ``exclude_modules`` (the same two forms) and ``modules_to_save`` take modules out.
- With which rank and alpha? The first key of ``rank_pattern`` (``alpha_pattern``), in the file's order,
  that matches as a regular expression the whole name or its end after a dot; else ``r`` (``lora_alpha``).
  The scale is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
- Is it kept whole (``modules_to_save``)? Its name ends with an entry (a plain string suffix).
- Is it DoRA? ``use_dora`` says so for every adapted module at once.
- Do its weights apply to the original base? Not when ``init_lora_weights`` names an initialization that
  rewrote the base at the start (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) and the adapter was not converted since
  (:attr:`PeftConfig.changed_base`).

:func:`read_config` refuses a file it cannot read as such a config (:class:`CheckpointCorruptError`) and one
that asks for what lora_jax does not compute (LoRA biases, QALoRA, ...; :class:`AdapterMismatchError`).
:func:`make_config` writes the config for given per-module ranks and alphas, and checks that PEFT reads back
exactly those.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_jax.errors import AdapterMismatchError, CheckpointCorruptError, LoraError
from lora_jax.typing import PathLike

Names = str | tuple[str, ...]
"""A module selector: a regular expression for the whole name, or a tuple of names / name suffixes."""

# Options whose use changes the numbers in ways lora_jax does not compute: name -> what it is.
BIASES = ("none", "all", "lora_only")
"""PEFT's ``bias`` settings: no bias trains; every bias of the model; the adapted modules' biases."""
UNSUPPORTED = {
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
# init_lora_weights values after which the file's weights apply to the original base as they are.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# init_lora_weights values that subtract the initial adapter from the base (a prefix for "pissa_niter_K").
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
FIX = "re-save the adapter with PEFT's save_pretrained, or restore the file from its source"


def _corrupt(file: Path, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{file}: {what}; {FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too long for a float
        return False


def _json_kind(value: Any) -> str:
    """Return the JSON name of a parsed value's kind."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _regex(file: Path, setting: str, pattern: str, template: str) -> None:
    """Refuse ``pattern`` if it does not compile inside ``template`` (where PEFT puts it)."""
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise _corrupt(file, f"{setting} entry {pattern!r} is not a regular expression ({err})") from None


def pattern_matches(key: str, module: str) -> bool:
    """Return whether a ``rank_pattern``/``alpha_pattern`` key selects ``module``: the key, a regular expression,
    matches the whole name or the part after one of its dots."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", module) is not None


def _saved_family(entry: str, module: str) -> bool:
    """Return whether ``module`` is the ``modules_to_save`` entry ``entry`` (a regex) or inside or above it,
    which PEFT never adapts."""
    return re.fullmatch(rf"(?:.*\.)?(?:{entry})(?:\..*)?", module) is not None


def _selects(selector: Names, module: str) -> bool:
    """Return whether a list selector names ``module`` or a suffix of it after a dot, or a string one matches it."""
    if isinstance(selector, str):
        return re.fullmatch(selector, module) is not None
    return any(module == name or module.endswith("." + name) for name in selector)


def _layer_index(module: str, layers_pattern: tuple[str, ...]) -> int | None:
    """Return the layer index of ``module``: the number after the first ``.{pattern}.`` (any component when no
    pattern is given, not the first one) that another component follows; None when there is none."""
    if not layers_pattern:
        parts = module.split(".")
        return next((int(parts[j]) for j in range(2, len(parts) - 1) if parts[j].isdecimal()), None)
    for pattern in layers_pattern:
        found = re.match(rf".*?\.(?:{pattern})\.(\d+)\.", module)
        if found:
            return int(found.group(1))
    return None


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The LoRA settings of one ``adapter_config.json``, checked; ask it per module name."""

    file: Path
    rank: int
    alpha: float
    rslora: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    target_modules: Names
    exclude_modules: Names | None = None
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    dropout: float = 0.0
    dora: bool = False
    init: bool | str = True
    bias: str = "none"

    @property
    def changed_base(self) -> str | None:
        """Return the ``init_lora_weights`` that rewrote the base at the start (``"pissa"``, ...), else None.

        PEFT subtracts such an initial adapter from the base weights, so the file's weights apply to that residual
        base, not to the original model, until it is converted (``save_pretrained(...,
        path_initial_model_for_weight_conversion=...)`` writes ``init_lora_weights: true``).
        """
        if isinstance(self.init, str) and self.init.startswith(BASE_CHANGING_INITS):
            return self.init
        return None

    def rank_of(self, module: str) -> tuple[int, str]:
        """Return the rank of ``module`` and the setting it comes from (``r`` or ``rank_pattern['key']``)."""
        for key, value in self.rank_pattern:
            if pattern_matches(key, module):
                return value, f"rank_pattern[{key!r}]"
        return self.rank, "r"

    def alpha_of(self, module: str) -> tuple[float, str]:
        """Return the alpha of ``module`` and the setting it comes from (``lora_alpha`` or ``alpha_pattern['key']``)."""
        for key, value in self.alpha_pattern:
            if pattern_matches(key, module):
                return value, f"alpha_pattern[{key!r}]"
        return self.alpha, "lora_alpha"

    def scale_of(self, module: str) -> float:
        """Return ``s`` for ``module``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        rank, alpha = self.rank_of(module)[0], self.alpha_of(module)[0]
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def describe(self, module: str) -> str:
        """Return ``r=.., lora_alpha=.., scale ..`` for ``module``, saying where each value comes from."""
        (rank, rank_from), (alpha, alpha_from) = self.rank_of(module), self.alpha_of(module)
        kind = "rsLoRA" if self.rslora else "standard"
        scale = self.scale_of(module)
        return f"r={rank} (from {rank_from}), lora_alpha={alpha:g} (from {alpha_from}), scale {scale:g} ({kind})"

    def adapts(self, module: str) -> bool:
        """Return whether PEFT puts a LoRA adapter on ``module``."""
        if self.exclude_modules is not None and _selects(self.exclude_modules, module):
            return False
        if any(_saved_family(entry, module) for entry in self.modules_to_save):
            return False
        if isinstance(self.target_modules, str) or module in self.target_modules:
            return _selects(self.target_modules, module)
        if not _selects(self.target_modules, module):
            return False
        if self.layers_to_transform is None:
            return True
        return _layer_index(module, self.layers_pattern) in self.layers_to_transform

    def saves(self, module: str) -> bool:
        """Return whether PEFT keeps ``module`` whole (``modules_to_save``)."""
        return any(module.endswith(entry) for entry in self.modules_to_save)

    def trains_bias(self, module: str) -> bool:
        """Return whether PEFT trains and saves the bias of ``module`` beside LoRA: every module's under
        ``bias="all"``, an adapted module's under ``"lora_only"`` (a module kept whole keeps its bias anyway)."""
        if self.saves(module):
            return False
        return self.bias == "all" or (self.bias == "lora_only" and self.adapts(module))

    def bias_key(self, module: str) -> str:
        """Return the tensor name PEFT saves ``module``'s bias under: an adapted module's lives on its base layer."""
        return f"{module}.base_layer.bias" if self.adapts(module) else f"{module}.bias"

    def check_targets(self, modules: Iterable[str]) -> None:
        """Refuse a config whose ``target_modules`` select none of ``modules``, as PEFT does.

        Raises:
          AdapterMismatchError: naming the file, the targets and the closest module names.
        """
        modules = sorted(set(modules))
        if any(self.adapts(m) for m in modules):
            return
        wanted = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        endings = sorted({m.rsplit(".", 1)[-1] for m in modules})
        close: list[str] = []
        for name in wanted:
            close += [c for c in difflib.get_close_matches(name, modules + endings, n=3, cutoff=0.5) if c not in close]
        layers = f", layers_to_transform {list(self.layers_to_transform)}" if self.layers_to_transform else ""
        raise AdapterMismatchError(
            f"{self.file}: target_modules {self.targets_text}{layers} select no module of the base model "
            f"(PEFT refuses this too); {'closest: ' + ', '.join(close[:6]) + '; ' if close else ''}the model's "
            f"modules end in {', '.join(endings[:12])}{', ...' if len(endings) > 12 else ''}. Load the adapter "
            "onto the model it was trained for, or fix target_modules"
        )

    @property
    def targets_text(self) -> str:
        """Return ``target_modules`` as the file spells it: a list, or a regex string."""
        targets = self.target_modules
        return repr(targets if isinstance(targets, str) else list(targets))


def _names(file: Path, setting: str, value: Any, *, regex: bool, string: bool = True) -> Names | None:
    """Check a selector: null, a string (a regular expression; when ``string``) or a list of strings."""
    if value is None:
        return None
    if isinstance(value, str) and string:
        if regex:
            _regex(file, setting, value, "{}")
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        kinds = "a list of module names or a regular expression" if string else "a list of module names"
        raise _corrupt(file, f"{setting} must be {kinds}, got {value!r}")
    return tuple(value)


def _pattern(file: Path, setting: str, value: Any, check: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    """Check ``rank_pattern``/``alpha_pattern``: null or an object of regular expression -> value."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _corrupt(file, f"{setting} must be an object of module pattern -> {kind}, got {value!r}")
    for key, item in value.items():
        _regex(file, setting, key, r"(?:.*\.)?(?:{})")
        if not check(item):
            raise _corrupt(file, f"{setting}[{key!r}] must be a {kind}, got {item!r}")
    return tuple(value.items())


def parse_config(data: Any, file: PathLike) -> PeftConfig:
    """Check the contents of an ``adapter_config.json`` and return its LoRA settings.

    Args:
      data: the parsed JSON.
      file: the file it came from, for messages.

    Raises:
      CheckpointCorruptError: not an object; ``r``, ``lora_alpha`` or another setting missing or of the
        wrong kind (a non-positive or non-integer rank, a non-numeric alpha, a pattern that is no regex).
      AdapterMismatchError: not a LoRA adapter, or one using an option lora_jax does not compute (an
        ``init_lora_weights`` it does not know, ...).
    """
    file = Path(file)
    if not isinstance(data, dict):
        raise _corrupt(file, f"holds a JSON {_json_kind(data)}, not an object of PEFT settings")
    kind = data.get("peft_type")
    if not isinstance(kind, str):
        raise _corrupt(file, f'has no peft_type string (got {kind!r}); a PEFT LoRA config has "peft_type": "LORA"')
    if kind != "LORA":
        raise AdapterMismatchError(f"{file}: peft_type {kind!r} is not LORA; lora_jax reads PEFT LoRA adapters only")
    for option, what in UNSUPPORTED.items():
        if data.get(option) not in (None, False, [], {}):
            raise AdapterMismatchError(
                f"{file}: {option}={data[option]!r} asks for {what}, which lora_jax does not compute; "
                "train the adapter without it to use it here"
            )
    bias = "none" if data.get("bias") is None else data["bias"]
    if bias not in BIASES:
        raise _corrupt(file, f"bias must be one of {', '.join(map(repr, BIASES))}, got {bias!r}")
    for key, what in (("r", "the LoRA rank"), ("lora_alpha", "the scale's numerator")):
        if key not in data:
            raise _corrupt(file, f"has no {key} ({what}); a PEFT LoRA config always records it")
    if not _is_int(data["r"]) or data["r"] < 1:
        raise _corrupt(file, f"r must be a positive integer (the LoRA rank), got {data['r']!r}")
    if not _is_number(data["lora_alpha"]):
        raise _corrupt(file, f"lora_alpha must be a finite number, got {data['lora_alpha']!r}")
    rslora = data.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise _corrupt(file, f"use_rslora must be true or false, got {rslora!r}")
    dora = data.get("use_dora", False)
    dora = False if dora is None else dora
    if not isinstance(dora, bool):
        raise _corrupt(file, f"use_dora must be true or false, got {dora!r}")
    init = data.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise _corrupt(file, f"init_lora_weights must be true, false or an initialization's name, got {init!r}")
    if init not in PLAIN_INITS and not (isinstance(init, str) and init.startswith(BASE_CHANGING_INITS)):
        known = ", ".join(repr(i) for i in (*PLAIN_INITS[2:], *BASE_CHANGING_INITS))
        raise AdapterMismatchError(
            f"{file}: init_lora_weights={init!r} is an initialization lora_jax does not know (it knows true, false, "
            f"{known}), so it cannot tell whether the weights apply to the original base; if they do, set it to "
            "true, else convert the adapter in PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )
    dropout = data.get("lora_dropout", 0.0)
    dropout = 0.0 if dropout is None else dropout
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise _corrupt(file, f"lora_dropout must be a number in [0, 1), got {dropout!r}")
    targets = _names(file, "target_modules", data.get("target_modules"), regex=True)
    if targets is None:
        raise _corrupt(file, "target_modules is missing; PEFT writes the modules it adapted there")
    saved = _names(file, "modules_to_save", data.get("modules_to_save"), regex=False, string=False) or ()
    assert not isinstance(saved, str)
    for entry in saved:
        _regex(file, "modules_to_save", entry, "{}")
    given = data.get("layers_to_transform")
    listed: list[Any] = [given] if _is_int(given) else given if isinstance(given, list) else []
    if (given is not None and not listed and given != []) or not all(_is_int(i) for i in listed):
        raise _corrupt(file, f"layers_to_transform must be a layer index or a list of them, got {given!r}")
    layers = tuple(int(i) for i in listed) or None  # PEFT ignores an empty list
    layers_pattern = _names(file, "layers_pattern", data.get("layers_pattern"), regex=False) or ()
    layers_pattern = (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern
    for pattern in layers_pattern:
        _regex(file, "layers_pattern", pattern, "{}")
    return PeftConfig(
        file=file,
        rank=data["r"],
        alpha=data["lora_alpha"],
        rslora=rslora,
        rank_pattern=_pattern(
            file, "rank_pattern", data.get("rank_pattern"), lambda v: _is_int(v) and v > 0, "positive integer"
        ),
        alpha_pattern=_pattern(file, "alpha_pattern", data.get("alpha_pattern"), _is_number, "finite number"),
        target_modules=targets,
        exclude_modules=_names(file, "exclude_modules", data.get("exclude_modules"), regex=True),
        modules_to_save=saved,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        dropout=float(dropout),
        dora=dora,
        init=init,
        bias=bias,
    )


def read_config(path: PathLike) -> PeftConfig:
    """Read and check an ``adapter_config.json``; see :func:`parse_config`.

    Raises:
      CheckpointCorruptError: the file cannot be read, is not UTF-8 JSON, or is not a LoRA config.
      AdapterMismatchError: as :func:`parse_config`.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise _corrupt(path, f"is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise _corrupt(path, f"cannot be read ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _corrupt(path, f"is not JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise _corrupt(path, f"is not JSON ({type(err).__name__})") from None
    return parse_config(data, path)


def _most_common(values: list[Any]) -> Any:
    """Return the most common of ``values``, the first seen on a tie."""
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _shortest_suffix(module: str, others: set[str], dotted: bool) -> str:
    """Return the shortest suffix of whole components of ``module`` that selects none of ``others``: after a dot
    (``target_modules``) or as a plain string suffix (``modules_to_save``); else the whole name."""
    parts = module.split(".")
    for k in range(1, len(parts)):
        suffix = ".".join(parts[-k:])
        if dotted and not any(o == suffix or o.endswith("." + suffix) for o in others):
            return suffix
        if not dotted and not any(o.endswith(suffix) for o in others):
            return suffix
    return module


def make_config(
    adapted: Mapping[str, tuple[int, float]],
    saved: Iterable[str],
    modules: Iterable[str],
    *,
    rslora: bool,
    dropout: float,
    dora: bool = False,
) -> dict[str, Any]:
    """Return the LoRA settings of an ``adapter_config.json`` that give each module its rank and alpha in PEFT.

    Args:
      adapted: PEFT module name -> ``(rank, alpha)`` of each adapted module.
      saved: the modules kept whole (``modules_to_save``); a module whose bias alone trains is PEFT's ``bias``
        option instead (:func:`lora_jax.io.peft.to_peft` sets it).
      modules: every module name of the model, containers included: targets must select no other.
      rslora: the scaling of all modules.
      dropout: ``lora_dropout``.
      dora: ``use_dora``, for all modules.

    Returns:
      ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, ``lora_dropout``, ``rank_pattern``, ``alpha_pattern``,
      ``target_modules`` and ``modules_to_save``; ``r`` and ``lora_alpha`` are the most common values, the
      patterns name the other modules.

    Raises:
      LoraError: PEFT would read other settings back (a module both adapted and kept whole).
    """
    saved = sorted(set(saved))
    both = sorted(set(saved) & set(adapted))
    if both:
        raise LoraError(
            f"PEFT cannot express this adapter: it adapts {both[0]} with LoRA and trains another of its leaves in "
            "full (a bias, say); PEFT keeps a module either way, not both (its bias='all' / 'lora_only' options "
            "are not written by lora_jax): drop the trainable rule for that module, or export it without LoRA"
        )
    modules = set(modules) | set(adapted) | set(saved)
    rank = _most_common([r for r, _ in adapted.values()])
    alpha = _most_common([a for _, a in adapted.values()])
    config: dict[str, Any] = {
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "use_dora": dora,
        "lora_dropout": dropout,
        "target_modules": sorted({_shortest_suffix(m, modules - set(adapted), dotted=True) for m in adapted}),
        "modules_to_save": sorted({_shortest_suffix(m, modules - set(saved), dotted=False) for m in saved}) or None,
    }
    # Plain module names read best; if one of them, as a regex, also selects another module, anchor them all.
    for spell in (lambda m: m, lambda m: "^" + re.escape(m)):
        config["rank_pattern"] = {spell(m): r for m, (r, _) in adapted.items() if r != rank}
        config["alpha_pattern"] = {spell(m): a for m, (_, a) in adapted.items() if a != alpha}
        read = parse_config({"peft_type": "LORA", **config}, "adapter_config.json")
        wrong = [m for m, (r, a) in adapted.items() if (read.rank_of(m)[0], read.alpha_of(m)[0]) != (r, a)]
        if not wrong:
            break
    wrong += [m for m in modules if read.adapts(m) != (m in adapted) or read.saves(m) != (m in saved)]
    if wrong:
        raise LoraError(
            f"PEFT cannot express this adapter: it would read {wrong[0]} differently ({read.describe(wrong[0])})"
        )
    return config
