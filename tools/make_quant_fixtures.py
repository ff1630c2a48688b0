#!/usr/bin/env python3
"""Writes the golden fixtures of tests/kernels/quant_test.cc into tests/fixtures/quant/.

The gguf Python package (llama.cpp's own, with numpy) is the independent implementation the C++
block code is checked against:

  <type>.blocks.bin      a few rows of one GGUF block type, as ggml stores them (row-major blocks).
  <type>.f32.bin         gguf.quants.dequantize of those bytes, little-endian f32, row-major.
  <type>.source.f32.bin  (q8_0, q4_0, q4_1) the f32 rows the blocks were quantized from by
                         gguf.quants.quantize, which reproduces ggml's quantize_row_*_ref bit for
                         bit; the C++ QuantizeRow must give the same bytes (q8_0, q4_0).
  manifest.json          each type's rows, cols and files, and the versions used.

The source rows mix random values of several magnitudes with hand-made blocks that pin down the
rounding rules: an all-zero block, ties that roundf (half away from zero) and round-half-even
treat differently, a maximum magnitude that appears with both signs, values past the top code,
and scales small enough to be f16 subnormals. The gguf package cannot quantize Q4_K, Q5_K or Q6_K,
so those blocks are random bytes with small finite f16 super-block scales: every bit pattern of the
packed scales, mins and codes is a valid block.

Needs only:  python3 -m pip install gguf numpy
Regenerate (from the repository root):  python3 tools/make_quant_fixtures.py
"""

import importlib.metadata
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "quant")

ROWS = 3
COLS_32 = 128  # four 32-value blocks per row
COLS_K = 512   # two 256-value super-blocks per row


def special_blocks():
    """32-value blocks whose quantization exercises the rounding and selection rules."""
    blocks = [np.zeros(32, np.float32)]
    # max|x| = 127 gives d = 1 exactly (q8_0): x.5 values are ties for roundf.
    b = np.linspace(-3.5, 3.5, 32).astype(np.float32)
    b[:8] = [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5]
    blocks.append(b)
    # q4_0 takes the first value of largest magnitude (here +8 before -8): d = -1, and
    # x / d + 8.5 lands on integers and on 16.x (clipped to 15).
    b = np.array([8.0, -8.0, 7.5, -7.5, 0.5, -0.5, 3.25, -3.25] * 4, np.float32)
    blocks.append(b)
    # Scales that are f16 subnormals (d < 6.1e-5).
    blocks.append((np.arange(32, dtype=np.float32) - 15.5) * np.float32(3e-7))
    return blocks


def source_rows(rng, cols):
    rows = []
    for r in range(ROWS):
        scale = [1.0, 0.02, 30.0][r % 3]
        rows.append(rng.standard_normal(cols).astype(np.float32) * np.float32(scale))
    x = np.stack(rows)
    specials = special_blocks()
    flat = x.reshape(-1, 32)
    for i, b in enumerate(specials):
        flat[i * 2] = b  # spread over rows and block positions
    return flat.reshape(ROWS, cols)


def random_k_blocks(rng, qtype, n_blocks):
    """Random bytes with finite, small f16 scales in the d / dmin fields."""
    _, type_size = quants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    def f16_bytes(lo, hi):
        v = rng.uniform(lo, hi, size=n_blocks).astype(np.float16)
        return v.view(np.uint8).reshape(n_blocks, 2)
    if qtype == QT.Q6_K:
        raw[:, 208:210] = f16_bytes(1e-4, 2e-2)  # d at the end
    else:
        raw[:, 0:2] = f16_bytes(1e-4, 2e-2)      # d
        raw[:, 2:4] = f16_bytes(1e-4, 2e-2)      # dmin
    return raw


def write(name, array):
    path = os.path.join(OUT, name)
    array.tofile(path)
    return name


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240611)
    manifest = {
        "versions": {
            "gguf": importlib.metadata.version("gguf"),
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "script": "tools/make_quant_fixtures.py",
        },
        "tensors": [],
    }
    for qtype in [QT.Q8_0, QT.Q4_0, QT.Q4_1]:
        name = qtype.name.lower()
        src = source_rows(rng, COLS_32)
        blocks = quants.quantize(src, qtype)  # uint8 [rows, row bytes]
        deq = quants.dequantize(blocks, qtype).astype(np.float32)
        assert deq.shape == (ROWS, COLS_32)
        manifest["tensors"].append({
            "type": name, "rows": ROWS, "cols": COLS_32,
            "blocks": write(name + ".blocks.bin", blocks),
            "dequantized": write(name + ".f32.bin", deq),
            "source": write(name + ".source.f32.bin", src.astype("<f4")),
        })
    for qtype in [QT.Q4_K, QT.Q5_K, QT.Q6_K]:
        name = qtype.name.lower().replace("_k", "_K")
        block_size, _ = quants.GGML_QUANT_SIZES[qtype]
        blocks = random_k_blocks(rng, qtype, ROWS * COLS_K // block_size)
        blocks = blocks.reshape(ROWS, -1)
        deq = quants.dequantize(blocks, qtype).astype(np.float32)
        assert deq.shape == (ROWS, COLS_K) and np.all(np.isfinite(deq))
        manifest["tensors"].append({
            "type": name, "rows": ROWS, "cols": COLS_K,
            "blocks": write(name + ".blocks.bin", blocks),
            "dequantized": write(name + ".f32.bin", deq.astype("<f4")),
        })
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
