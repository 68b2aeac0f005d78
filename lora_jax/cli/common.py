"""What the verbs share: messages, lists on the command line, files not to overwrite, a model for an adapter."""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lora_jax.errors import LoraError
from lora_jax.spec import LoraSpec
from lora_jax.typing import PathLike

PROG = "lora-jax"
RUN_FILE = "run.json"
"""The file ``train`` writes beside the adapter: its arguments, labels, model options and scores."""


def one_line(message: Any) -> str:
    """Return ``str(message)`` on one line (its lines joined with ``; ``)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def say(message: str) -> None:
    """Print a progress message on stderr, leaving stdout to results."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def split_list(text: str) -> list[str]:
    """Return the comma-separated items of ``text`` (``"a,b"`` -> ``["a", "b"]``), blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def targets_arg(text: str) -> str | list[str]:
    """Return ``--targets``: a preset (``qv``, ``all-linear``) or a comma-separated list of names (``q,v,up``)."""
    return split_list(text) if "," in text else text


def refuse_existing(paths: Iterable[PathLike], overwrite: bool) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists, unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def run_record(adapter: PathLike) -> dict[str, Any]:
    """Return the ``run.json`` that ``train`` wrote beside ``adapter``, or ``{}`` when there is none.

    Raises:
      LoraError: the file is there but not JSON, or a field ``train`` writes has another type (names it).
    """
    file = Path(adapter).parent / RUN_FILE
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(f"{file}: not JSON ({err}); remove it or restore it") from None
    _check_type(file, "", record, dict)
    for name, kind in {"arguments": dict, "data": dict, "model": dict, "labels": list, "status": str}.items():
        if name in record:
            _check_type(file, name, record[name], kind)
    model = record.get("model", {})
    for name, kind in {"architecture": str, "options": dict}.items():
        if name in model:
            _check_type(file, f"model.{name}", model[name], kind)
    for name, kind in _OPTIONS.items():
        if name in model.get("options", {}):
            _check_type(file, f"model.options.{name}", model["options"][name], kind)
    return record


_OPTIONS = {"num_labels": int, "pooling": str}
"""The model options ``train`` writes into ``run.json`` and their types."""
_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _check_type(file: Path, name: str, value: Any, kind: type) -> None:
    """Refuse a ``run.json`` field (``name``, dotted; empty for the whole file) that is not of ``kind``."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        where = f'"{name}"' if name else "the file"
        raise LoraError(
            f"{file}: {where} is {type(value).__name__} {json.dumps(value)[:60]}, expected {_KINDS[kind]}; "
            "restore the file, or remove it"
        )


def model_options(adapter: PathLike | None, architecture: str | None, num_labels: int | None) -> dict[str, Any]:
    """Return ``from_pretrained``'s options for the base of ``adapter``: the command line's, else its ``run.json``'s."""
    saved = run_record(adapter).get("model", {}) if adapter is not None else {}
    options = {"architecture": saved.get("architecture"), **saved.get("options", {})}
    if architecture is not None:
        options["architecture"] = architecture
    if num_labels is not None:
        options["num_labels"] = num_labels
    return {name: value for name, value in options.items() if value is not None}


def load_model(model_dir: PathLike, *, scan: bool = False, **options: Any) -> Any:
    """Return ``(model, params)`` of ``model_dir`` (:func:`lora_jax.models.from_pretrained`).

    Args:
      model_dir: a Hugging Face model directory.
      scan: load the scanned layer layout.
      **options: ``architecture`` and the architecture's options (``num_labels``, ``pooling``).

    Raises:
      FileNotFoundError: no such directory, or no ``config.json`` / weights in it.
    """
    from lora_jax import models

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    return models.from_pretrained(model_dir, scan_layers=scan, **options)


def is_scanned(spec: LoraSpec) -> bool:
    """Return whether ``spec`` was made for a scanned layout: a LoRA rule with stack axes."""
    return any(rule.mode == "lora" and rule.stack_axes for rule in spec.rules)


def trains_head(spec: LoraSpec, model: Any) -> bool:
    """Return whether a rule of ``spec`` makes ``model``'s task head trainable."""
    from lora_jax import models

    head = models.ARCHITECTURES.of(model).head
    return head is not None and any(
        rule.mode == "train" and isinstance(rule.pattern, str) and re.fullmatch(rule.pattern, f"{head}/kernel")
        for rule in spec.rules
    )


def load_for_spec(
    model_dir: PathLike, options: dict[str, Any], spec_of: Callable[[Any], LoraSpec], *, scan: bool = False
) -> tuple[Any, Any, LoraSpec]:
    """Return ``(model, params, spec)``: the model an adapter goes on, and the adapter's spec.

    A task head drawn afresh is no news when the spec trains it, so that warning is dropped then.

    Args:
      model_dir: the base model's directory.
      options: ``from_pretrained``'s options (:func:`model_options`).
      spec_of: ``model -> spec`` (a stored spec, or a PEFT adapter's, which needs the model's names).
      scan: load the scanned layer layout.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, params = load_model(model_dir, scan=scan, **options)
    spec = spec_of(model)
    for warning in caught:
        if not ("drawing a new one" in str(warning.message) and trains_head(spec, model)):
            warnings.warn(str(warning.message), stacklevel=2)
    return model, params, spec


def adapter_on(model_dir: PathLike, adapter: PathLike, architecture: str | None, num_labels: int | None) -> Any:
    """Return ``(model, params, lora, spec)`` for an adapter file on the model in ``model_dir``.

    The base is built as ``train`` built it (its ``run.json``) unless ``architecture`` / ``num_labels`` say
    otherwise, in the layout the adapter's spec was made for.
    """
    import lora_jax as lj

    if not Path(adapter).is_file():
        raise FileNotFoundError(f"{adapter}: no such adapter file")
    options = model_options(adapter, architecture, num_labels)
    stored = LoraSpec.from_file(adapter)
    model, params, spec = load_for_spec(model_dir, options, lambda _: stored, scan=is_scanned(stored))
    return model, params, lj.load_adapter(adapter, params, spec), spec
