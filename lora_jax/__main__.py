"""``python -m lora_jax``: the ``lora-jax`` command line (:mod:`lora_jax.cli`)."""

from lora_jax.cli import main

raise SystemExit(main())
