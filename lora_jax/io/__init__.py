"""Everything lora_jax saves: adapter files and Hugging Face PEFT folders, through one atomic writer.

| module | holds |
|---|---|
| :mod:`~lora_jax.io.atomic` | ``write_atomic``, ``write_directory_atomic``: all or nothing, never over a file unasked |
| :mod:`~lora_jax.io.adapter` | ``save_adapter`` / ``load_adapter``: one safetensors file with its spec's signature |
| :mod:`~lora_jax.io.peft` | ``save_peft`` / ``load_peft`` / ``load_peft_pissa``: PEFT folders (LoRA, DoRA, PiSSA) |
| :mod:`~lora_jax.io.peft_spec` | ``spec_from_peft``: the spec of a PEFT adapter (``LoraSpec.from_peft``) |
"""

from lora_jax._extras import require

require("safetensors", "io")  # before the modules below import it, so that a missing one names its extra

from lora_jax.errors import CheckpointCorruptError
from lora_jax.io import adapter, atomic, peft, peft_spec
from lora_jax.io.adapter import adapter_bytes, load_adapter, save_adapter
from lora_jax.io.atomic import refuse_existing, write_atomic, write_bytes, write_directory_atomic, write_text
from lora_jax.io.peft import HfName, NameTable, load_peft, load_peft_pissa, save_peft, to_peft

__all__ = [
    "adapter",
    "atomic",
    "peft",
    "peft_spec",
    "CheckpointCorruptError",
    "HfName",
    "NameTable",
    "adapter_bytes",
    "load_adapter",
    "load_peft",
    "load_peft_pissa",
    "refuse_existing",
    "save_adapter",
    "save_peft",
    "to_peft",
    "write_atomic",
    "write_bytes",
    "write_directory_atomic",
    "write_text",
]
