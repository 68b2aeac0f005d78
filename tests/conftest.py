import os

# Tests compare float32 numbers; keep XLA from using bfloat16 passes anywhere.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
