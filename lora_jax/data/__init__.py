"""Training data: GLUE-style classification (TFDS ArrayRecord builders, no TensorFlow), prompt-completion JSON Lines
for decoders, tokenization, batching."""

from lora_jax._extras import require

for _module in ("tensorflow_datasets", "array_record", "tokenizers"):
    require(_module, "data")  # before the modules below import them, so that a missing one names its extra

from lora_jax.data.batching import (
    DEFAULT_BUCKETS,
    TRAIN_GROUP,
    Batch,
    batches,
    bucket_length,
    buckets_up_to,
    num_batches,
    order,
)
from lora_jax.data.builder import TsvClassification, TsvConfig, prepare
from lora_jax.data.completions import Completion, Completions, encode_completions, read_completions
from lora_jax.data.encoding import Encoded, tokenize
from lora_jax.data.loading import Examples, load_split, task_for
from lora_jax.data.local import infer_labels, positional_header, read_split
from lora_jax.data.tasks import TASKS, Task, custom_task, get_task
from lora_jax.data.tsv import DataFileError, parse_tsv, read_tsv

__all__ = [
    "DEFAULT_BUCKETS",
    "TRAIN_GROUP",
    "TASKS",
    "Batch",
    "Completion",
    "Completions",
    "DataFileError",
    "Encoded",
    "Examples",
    "Task",
    "TsvClassification",
    "TsvConfig",
    "batches",
    "bucket_length",
    "buckets_up_to",
    "custom_task",
    "encode_completions",
    "get_task",
    "infer_labels",
    "load_split",
    "num_batches",
    "order",
    "parse_tsv",
    "positional_header",
    "prepare",
    "read_completions",
    "read_split",
    "read_tsv",
    "task_for",
    "tokenize",
]
