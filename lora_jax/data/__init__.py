"""GLUE-style classification data: TFDS ArrayRecord builders (no TensorFlow), tokenization, batching, metrics."""

from lora_jax.data.batching import DEFAULT_BUCKETS, Batch, batches, bucket_length, num_batches, order
from lora_jax.data.builder import TsvClassification, TsvConfig, prepare
from lora_jax.data.encoding import Encoded, tokenize
from lora_jax.data.loading import Examples, default_glue_dir, load_split, resolve_task
from lora_jax.data.tasks import TASKS, TaskSpec, custom_task, get_task
from lora_jax.data.tsv import DataFileError, parse_tsv, read_tsv
from lora_jax.training.metrics import METRICS, accuracy, compute_metrics, confusion_matrix, f1, matthews_corrcoef

__all__ = [
    "DEFAULT_BUCKETS",
    "METRICS",
    "TASKS",
    "Batch",
    "DataFileError",
    "Encoded",
    "Examples",
    "TaskSpec",
    "TsvClassification",
    "TsvConfig",
    "accuracy",
    "batches",
    "bucket_length",
    "compute_metrics",
    "confusion_matrix",
    "custom_task",
    "default_glue_dir",
    "f1",
    "get_task",
    "load_split",
    "matthews_corrcoef",
    "num_batches",
    "order",
    "parse_tsv",
    "prepare",
    "read_tsv",
    "resolve_task",
    "tokenize",
]
