"""The ``lora-jax`` command line: describe, train, train-lm, merge, export-peft, import-peft, generate.

    lora-jax describe MODEL_DIR --targets qv --rank 8
    lora-jax train MODEL_DIR DATA_DIR --text-columns sentence --label-column label --out RUN_DIR
    lora-jax train-lm MODEL_DIR DATA_DIR --quantize nf4 --out RUN_DIR
    lora-jax merge MODEL_DIR RUN_DIR/adapter.safetensors --out MERGED_DIR
    lora-jax export-peft ADAPTER MODEL_DIR --out PEFT_DIR
    lora-jax import-peft PEFT_DIR MODEL_DIR --out ADAPTER
    lora-jax generate MODEL_DIR --prompt-ids 1,2,3 --max-new-tokens 20

Each verb is a thin layer over the library (:mod:`lora_jax.models`, :mod:`lora_jax.data`,
:mod:`lora_jax.training`, :mod:`lora_jax.io`); ``lora-jax VERB --help`` gives its options. A refusal
(a :class:`~lora_jax.LoraError`, a missing or existing file) prints one line,
``lora-jax: error: ...``, and exits with status 2; warnings print as ``lora-jax: warning: ...``.
The verbs import what they use when they run, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lora_jax.cli import train, train_lm, verbs
from lora_jax.cli.common import PROG, one_line
from lora_jax.errors import LoraError

EXIT_REFUSED = 2  # argparse's status for a bad command line, too


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``lora-jax`` with one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA for JAX from the command line: describe, fine-tune, merge, convert and generate.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs.add_describe(sub)
    train.add_train(sub)
    train_lm.add_train_lm(sub)
    verbs.add_merge(sub)
    verbs.add_export_peft(sub)
    verbs.add_import_peft(sub)
    verbs.add_generate(sub)
    return parser


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-jax`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Returns:
      0 on success, 2 when the input was refused (the message is printed on one line).
    """
    args = build_parser().parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return args.run(args)
    except (LoraError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        warnings.showwarning = previous
