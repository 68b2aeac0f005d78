"""The verbs on a model and an adapter: describe, merge, export-peft, import-peft, generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

from lora_jax.cli.common import (
    adapter_on,
    load_for_spec,
    load_model,
    model_options,
    refuse_existing,
    run_record,
    say,
    split_list,
    targets_arg,
)
from lora_jax.errors import LoraError

Subparsers = Any  # argparse's private _SubParsersAction

TARGETS_HELP = "a preset (qv, qk, qkv, qkvo, all-linear) or comma-separated names (q,v,up); default qv"


def _model_choice(parser: argparse.ArgumentParser) -> None:
    """Add the options that pick the module built on an adapter's base."""
    parser.add_argument(
        "--architecture",
        help="the Hugging Face architecture to build (default: run.json beside the adapter, else config.json)",
    )
    parser.add_argument("--num-labels", type=int, help="classes of a classifier head (default: as for --architecture)")


# describe ---------------------------------------------------------------------------------------


def add_describe(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "describe",
        help="print which kernels a LoRA preset adapts in a model, with shapes, ranks and counts",
        description="Print lora_jax.describe of a LoRA preset (lora_jax.models.lora_spec) on a Hugging Face model.",
    )
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (config.json + safetensors)"
    )
    parser.add_argument("--targets", default="qv", help=TARGETS_HELP)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha; the scale is alpha / r (default: twice the rank)")
    parser.add_argument("--scan", action="store_true", help="the scanned layer layout (one stacked kernel per map)")
    parser.add_argument("--architecture", help="build this architecture instead of config.json's")
    parser.set_defaults(run=describe)


def describe(args: argparse.Namespace) -> int:
    import lora_jax as lj
    from lora_jax import models

    model, params = load_model(args.model_dir, scan=args.scan, **model_options(None, args.architecture, None))
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    spec = models.lora_spec(model, targets_arg(args.targets), rank=args.rank, alpha=alpha)
    print(lj.describe(params, spec))
    return 0


# merge ------------------------------------------------------------------------------------------


def add_merge(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "merge",
        help="merge an adapter into its model and write a Hugging Face model directory",
        description=(
            "Merge ADAPTER (a lora_jax adapter file) into the model in MODEL_DIR and write OUT as a Hugging Face "
            "model directory: config.json and model.safetensors in the checkpoint's own names and layouts, which "
            "transformers and lora_jax.models.from_pretrained load, plus MODEL_DIR's tokenizer files."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the base model's directory")
    parser.add_argument("adapter", metavar="ADAPTER", help="an adapter file (e.g. RUN_DIR/adapter.safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in DIR")
    _model_choice(parser)
    parser.set_defaults(run=merge)


def merge(args: argparse.Namespace) -> int:
    import lora_jax as lj
    from lora_jax import models
    from lora_jax.models.common.export import CONFIG_FILE, SIDE_FILES
    from lora_jax.models.common.loading import SINGLE_FILE

    out, source = Path(args.out), Path(args.model_dir)
    side = [name for name in SIDE_FILES if (source / name).is_file()]
    refuse_existing([out / name for name in (CONFIG_FILE, SINGLE_FILE, *side)], args.overwrite)
    model, params, lora, spec = adapter_on(source, args.adapter, args.architecture, args.num_labels)
    say(f"merging {args.adapter} into {source}")
    merged = lj.merge(params, lora, spec)
    labels = run_record(args.adapter).get("labels")
    labels = labels if labels and len(labels) == getattr(model.config, "num_labels", None) else None
    models.save_pretrained(out, model, merged, source=source, labels=labels, overwrite=True)
    print(f"wrote {out / SINGLE_FILE} and {out / CONFIG_FILE} ({type(model).__name__})")
    return 0


# PEFT -------------------------------------------------------------------------------------------


def add_export_peft(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "export-peft",
        help="write an adapter file as a Hugging Face PEFT folder",
        description=(
            "Write ADAPTER (a lora_jax adapter file for the model in MODEL_DIR) as a PEFT LoRA folder: "
            "adapter_model.safetensors and adapter_config.json."
        ),
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="a lora_jax adapter file")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the base model's directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the PEFT folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace the files already in DIR")
    _model_choice(parser)
    parser.set_defaults(run=export_peft)


def export_peft(args: argparse.Namespace) -> int:
    from lora_jax import models
    from lora_jax.io import peft

    out = Path(args.out)
    refuse_existing([out / peft.WEIGHTS, out / peft.CONFIG], args.overwrite)
    model, params, lora, spec = adapter_on(args.model_dir, args.adapter, args.architecture, args.num_labels)
    names = cast(peft.NameTable, models.hf_names(model))  # Tensor is a read-only HfName
    peft.save_peft(out, params, lora, spec, names, overwrite=True, base_model_name_or_path=str(args.model_dir))
    print(f"wrote {out / peft.WEIGHTS} and {out / peft.CONFIG}")
    return 0


def add_import_peft(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "import-peft",
        help="write a Hugging Face PEFT folder as a lora_jax adapter file",
        description=(
            "Read a PEFT LoRA folder made for the model in MODEL_DIR and write it as one self-describing lora_jax "
            "adapter file (the spec comes from adapter_config.json: lora_jax.LoraSpec.from_peft)."
        ),
    )
    parser.add_argument("peft_dir", metavar="PEFT_DIR", help="holds adapter_model.safetensors and adapter_config.json")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the base model's directory")
    parser.add_argument("--out", required=True, metavar="FILE", help="the adapter file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE")
    _model_choice(parser)
    parser.set_defaults(run=import_peft)


def import_peft(args: argparse.Namespace) -> int:
    import lora_jax as lj
    from lora_jax import models
    from lora_jax.io import peft, peft_spec

    refuse_existing([args.out], args.overwrite)
    config = peft_spec.peft_config(args.peft_dir)  # checked: its errors name the file
    raw = json.loads(config.file.read_text())
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    architecture = args.architecture or (base_class if base_class in models.ARCHITECTURES else None)
    options = model_options(None, architecture, args.num_labels)

    def spec_of(model: Any) -> lj.LoraSpec:
        return lj.LoraSpec.from_peft(args.peft_dir, models.hf_names(model))

    model, params, spec = load_for_spec(args.model_dir, options, spec_of)
    lora = peft.load_peft(args.peft_dir, params, spec, cast(peft.NameTable, models.hf_names(model)))
    path = lj.save_adapter(args.out, params, lora, spec, overwrite=True)
    print(f"wrote {path} ({len(spec.rules)} rules, {lj.trainable_count(lora):,} parameters)")
    return 0


# generate ---------------------------------------------------------------------------------------


def add_generate(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "generate",
        help="continue a prompt with a decoder model (GPT-2, Llama), with or without an adapter",
        description=(
            "Continue a prompt with the decoder in MODEL_DIR (merged with ADAPTER if given). Prints the token ids "
            "(prompt and continuation, comma-separated) and, when MODEL_DIR has tokenizer.json, the text."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a GPT-2 or Llama model directory")
    parser.add_argument("--adapter", metavar="FILE", help="a lora_jax adapter file to merge first")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", metavar="IDS", help="the prompt as comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt as text (needs MODEL_DIR/tokenizer.json)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="how many tokens to add (default 20)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); above 0 samples")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument("--architecture", help="build this architecture instead of config.json's")
    parser.set_defaults(run=generate)


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(item) for item in split_list(text)]
    except ValueError:
        raise LoraError(f"--prompt-ids {text!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not ids:
        raise LoraError("--prompt-ids is empty: give at least one token id")
    return ids


def generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import models

    if args.max_new_tokens < 1:
        raise LoraError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise LoraError(f"--temperature must be 0 or more, got {args.temperature}")
    model_dir = Path(args.model_dir)
    tokenizer = models.load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    if args.prompt is not None and tokenizer is None:
        raise FileNotFoundError(f"{model_dir / 'tokenizer.json'} not found: --prompt needs it; give --prompt-ids")
    lora, spec = None, None  # with an adapter: generated unmerged, through the factored path
    if args.adapter is not None:
        model, params, lora, spec = adapter_on(model_dir, args.adapter, args.architecture, None)
    else:
        model, params = load_model(model_dir, **model_options(None, args.architecture, None))
    ids = _prompt_ids(args.prompt_ids) if args.prompt is None else tokenizer.encode(args.prompt).ids  # pyright: ignore[reportOptionalMemberAccess]
    eos = getattr(model.config, "eos_token_id", None)
    tokens = models.generate(
        model,
        params,
        jnp.asarray([ids], jnp.int32),
        args.max_new_tokens,
        lora=lora,
        spec=spec,
        temperature=args.temperature,
        key=jax.random.key(args.seed) if args.temperature > 0 else None,
        top_k=args.top_k,
        eos_token_id=eos,
    )
    new = [int(t) for t in np.asarray(tokens)[0, len(ids) :]]
    if eos is not None and eos in new:  # what follows the end is padding
        new = new[: new.index(eos) + 1]
    print(",".join(str(t) for t in [*ids, *new]))
    if tokenizer is not None:
        print(tokenizer.decode([*ids, *new]))
    return 0
