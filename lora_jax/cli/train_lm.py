"""``lora-jax train-lm``: fine-tune a decoder (GPT-2, Llama) on prompt-completion JSON Lines, optionally QLoRA.

``DATA_DIR`` holds ``train.jsonl`` and ``dev.jsonl``, one ``{"prompt": ..., "completion": ...}`` (the loss counts
the completion and the model's end-of-sequence token) or ``{"text": ...}`` (every token counts) per line, checked
line by line (:mod:`lora_jax.data.completions`). ``--quantize nf4`` or ``int8`` trains the adapters on a quantized
base (QLoRA): the base's linear kernels are stored as codes and dequantized next to each product. The run
directory is ``train``'s (:mod:`lora_jax.cli.runs`): resumable, refused when started differently; ``dev`` scores are
the mean next-token loss over the completions' tokens and its perplexity. ``lora-jax generate MODEL_DIR --adapter
RUN_DIR/adapter.safetensors`` then continues prompts with the adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lora_jax.cli import runs
from lora_jax.cli.common import load_model, say, targets_arg
from lora_jax.cli.train import (
    add_run_options,
    check_dirs,
    check_numbers,
    check_remat,
    check_vocabulary,
    fit_run,
    remat_model,
    run_arguments,
)
from lora_jax.cli.verbs import TARGETS_HELP, Subparsers
from lora_jax.errors import LoraError

SPLIT_FILES = ("train.jsonl", "dev.jsonl")
QUANTIZE = ("none", "nf4", "int8")
DEFAULT_LEARNING_RATE = 2e-4  # the QLoRA paper's for 7B-13B models
DEFAULT_EPOCHS = 1.0


def add_train_lm(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "train-lm",
        help="fine-tune a decoder on prompt-completion JSON Lines (LoRA or QLoRA), resumably",
        description=(
            "Fine-tune the decoder in MODEL_DIR (GPT-2 or Llama, with tokenizer.json) on DATA_DIR/train.jsonl, "
            'one {"prompt": ..., "completion": ...} or {"text": ...} per line, scoring the next-token loss and '
            "perplexity of DATA_DIR/dev.jsonl's completions; write RUN_DIR as train does. --quantize trains on a "
            "quantized base (QLoRA). Run again with the same arguments to resume."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a GPT-2 or Llama model directory with tokenizer.json")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="a folder with train.jsonl and dev.jsonl")
    parser.add_argument("--targets", default="all-linear", help=f"LoRA targets: {TARGETS_HELP}; default all-linear")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none", help="the base's kernels (default none)")
    parser.add_argument(
        "--scan-layers", action="store_true", help="stack the layers under nn.scan: one block compiled, not one a layer"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=DEFAULT_LEARNING_RATE, help="peak AdamW rate (default 2e-4)"
    )
    parser.add_argument(
        "--loss-chunk",
        type=int,
        metavar="N",
        help="form the logits N positions at a time in the loss, never [B, T, vocab] whole (less memory)",
    )
    add_run_options(parser, "train.jsonl", epochs=DEFAULT_EPOCHS, batch_size=8, max_length=256)
    parser.set_defaults(run=train_lm)


def train_lm(args: argparse.Namespace) -> int:
    import lora_jax as lj
    from lora_jax import data, models, training

    check_numbers(args)
    if args.max_length < 2:
        raise LoraError(f"--max-length must be at least 2 (a token and the next), got {args.max_length}")
    if args.loss_chunk is not None and args.loss_chunk < 1:
        raise LoraError(f"--loss-chunk must be at least 1 position, got {args.loss_chunk}")
    files = check_dirs(args, ("config.json", "tokenizer.json"), SPLIT_FILES)
    check_remat(args.remat)
    model_dir, run_dir = Path(args.model_dir), Path(args.out)
    settings = run_arguments(args, DEFAULT_EPOCHS)
    runs.open_run(run_dir, settings, {f.name: runs.digest(f) for f in files}, args.overwrite)
    splits: dict[str, Path] = dict(zip(("train", "validation"), files, strict=True))
    examples = {split: data.read_completions(file) for split, file in splits.items()}

    model, params = load_model(model_dir, scan=args.scan_layers)
    if not isinstance(model, models.CausalLM):
        raise LoraError(f"{model_dir}: a {type(model).__name__}, not a decoder; train-lm takes GPT-2 or Llama models")
    model = remat_model(model, args.remat)
    cache = models.ARCHITECTURES.of(model).cache
    field = cache.max_positions if cache is not None else None  # learned positions cap the length
    if field is not None and args.max_length > getattr(model.config, field):
        raise LoraError(f"--max-length {args.max_length} exceeds the model's {field} = {getattr(model.config, field)}")
    tokenizer = models.load_tokenizer(model_dir)
    eos = getattr(model.config, "eos_token_id", None)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)  # masked out of attention and loss
    encoded = {
        split: data.encode_completions(found, tokenizer, args.max_length, eos, pad, splits[split])
        for split, found in examples.items()
    }
    check_vocabulary(encoded, splits, model.config.vocab_size, model_dir / "tokenizer.json")
    spec = models.lora_spec(model, targets_arg(args.targets), rank=args.rank, alpha=settings["alpha"])
    described = lj.describe(params, spec)
    if args.quantize != "none":
        params = lj.quantize(params, models.quant_rules(model, args.quantize))
    record: dict[str, Any] = {
        "arguments": settings,
        "data": {f.name: runs.digest(f) for f in files},
        "examples": {split: len(found) for split, found in encoded.items()},
        "cut_to_max_length": {split: found.cut for split, found in encoded.items()},
        "model": {"options": {}},
        "end_of_sequence": eos,
        "status": "started",
    }
    runs.write_record(run_dir, record)
    for split, found in encoded.items():
        if found.cut:
            name, limit = splits[split].name, args.max_length
            say(f"{found.cut} of {len(found)} examples of {name} lose their end to --max-length {limit}")

    chunk = args.loss_chunk
    objective = training.causal_lm(models.causal_lm_apply_fn(model, head=chunk is None), chunk)
    what = f"LoRA {args.targets} r={args.rank} on the {args.quantize + ' ' if args.quantize != 'none' else ''}base"
    return fit_run(args, run_dir, record, objective, params, spec, described, encoded, files[0], what)
