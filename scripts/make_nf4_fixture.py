"""Write tests/fixtures/nf4/bnb_nf4.npz: a fixed matrix quantized by bitsandbytes' NF4 (block 64, double quantization).

    .venv-ref/bin/python scripts/make_nf4_fixture.py     # needs torch and bitsandbytes (its CPU kernels)

The matrix has 97 x 201 entries (not a whole number of 64-blocks, an odd count), one all-zero block
and a few outliers. Saved: the input ``x``, bitsandbytes' dequantized ``x`` (``dequantized``), its packed
codes, the 8-bit codes of the block absmax values, the second-level scales and the offset (the mean
absmax), and its two code tables (``nf4_code``, ``absmax_code``).
"""

from pathlib import Path

import bitsandbytes.functional as bnb
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "nf4" / "bnb_nf4.npz"

rng = np.random.default_rng(0)
x = (0.02 * rng.standard_normal((97, 201))).astype(np.float32)
x.reshape(-1)[64:128] = 0.0  # the second block is all zeros
x[5, 7], x[60, 100], x[96, 200] = 0.5, -0.7, 0.3  # outliers, the last one in the partial block

packed, state = bnb.quantize_4bit(torch.from_numpy(x), blocksize=64, compress_statistics=True, quant_type="nf4")
dequantized = bnb.dequantize_4bit(packed, state).numpy()
assert state.state2 is not None and state.offset is not None
np.savez(
    OUT,
    x=x,
    dequantized=dequantized,
    codes=packed.numpy().reshape(-1),
    absmax_codes=state.absmax.numpy(),
    absmax_scales=state.state2.absmax.numpy(),
    offset=np.float32(state.offset.item()),
    nf4_code=state.code.numpy(),
    absmax_code=state.state2.code.numpy(),
    blocksize=np.int64(state.blocksize),
    absmax_blocksize=np.int64(state.state2.blocksize),
)
print(OUT, "max |x - deq|", float(np.abs(x - dequantized).max()))
