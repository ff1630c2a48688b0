#!/usr/bin/env python3
"""Writes the golden fixtures of the formats/ tests into tests/fixtures/gguf/.

Everything here is produced by libraries no one on this project wrote, so the C++ readers are
checked against an independent implementation:

  metadata.gguf            every GGUF metadata value type, arrays of each, nested arrays, a custom
                           general.alignment of 64 and one small F32 tensor placed by it;
                           metadata.expected.json lists every key with its types and value as the
                           gguf package's GGUFReader reads it back, and the tensor's file offset.
  tensors.gguf             tensors of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K with odd row
                           counts (and a 1-D and a 3-D one); tensors.expected.json names each with
                           shape (outermost first) and type, and tensors.expected.bin holds
                           gguf.quants.dequantize of the bytes GGUFReader reads back, as
                           little-endian f32, concatenated in the order of the json.
  small.safetensors        F32, F16 and BF16 tensors plus __metadata__, written by
                           safetensors.torch; small.expected.json holds the values widened by torch.
  sharded/                 a two-shard model with model.safetensors.index.json (same expected
                           format, sharded.expected.json).

Q8_0/Q4_0/Q4_1 data is quantized by gguf.quants.quantize from random floats. The gguf package cannot
quantize Q4_K or Q6_K, so those blocks are random bytes with small finite f16 super-block scales:
every bit pattern of the packed scales and quants is a valid block.

Regenerate (from the repository root):  python3 tools/make_gguf_fixtures.py
"""

import json
import os
import sys

import gguf
import numpy as np
import safetensors
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf")

VERSIONS = {
    "gguf": getattr(gguf, "__version__", None) or __import__("importlib.metadata").metadata.version("gguf"),
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
    "torch": torch.__version__,
    "python": sys.version.split()[0],
    "script": "tools/make_gguf_fixtures.py",
}


def json_value(vtype, value):
    """A metadata value as plain JSON: floats as exact decimal strings of their double value."""
    if vtype in (VT.FLOAT32, VT.FLOAT64):
        return repr(float(value))
    if vtype == VT.BOOL:
        return bool(value)
    if vtype == VT.STRING:
        return value
    return int(value)


def read_back_value(field):
    """(type names, JSON value) of a ReaderField as the gguf package's reader sees it.

    Returns value None for nested arrays, which the reader flattens; the caller takes their values
    from the input instead (their types still come from the file).
    """
    types = [GGUFValueTypeName(t) for t in field.types]
    if field.types[0] == VT.ARRAY:
        if len(field.types) > 2:
            return types, None
        sub = field.types[-1]
        return types, [json_value(sub, v) for v in field.contents()]
    return types, json_value(field.types[0], field.contents())


def GGUFValueTypeName(t):
    return VT(int(t)).name


def write_metadata():
    path = os.path.join(OUT, "metadata.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    scalars = [
        ("test.u8", 250, VT.UINT8),
        ("test.i8", -100, VT.INT8),
        ("test.u16", 65000, VT.UINT16),
        ("test.i16", -32000, VT.INT16),
        ("test.u32", 4000000000, VT.UINT32),
        ("test.i32", -2000000000, VT.INT32),
        ("test.f32", float(np.float32(3.14159)), VT.FLOAT32),
        ("test.bool_true", True, VT.BOOL),
        ("test.bool_false", False, VT.BOOL),
        ("test.string", "héllo, wörld ▁tokens", VT.STRING),
        ("test.empty_string", "", VT.STRING),
        ("test.u64", 18000000000000000000, VT.UINT64),
        ("test.i64", -9000000000000000000, VT.INT64),
        ("test.f64", 2.718281828459045, VT.FLOAT64),
    ]
    for key, val, vt in scalars:
        w.add_key_value(key, val, vt)
    arrays = [
        ("test.arr_u8", [0, 1, 255], VT.UINT8),
        ("test.arr_i8", [-128, 0, 127], VT.INT8),
        ("test.arr_u16", [1, 65535], VT.UINT16),
        ("test.arr_i16", [-32768, 32767], VT.INT16),
        ("test.arr_u32", [7, 4294967295], VT.UINT32),
        ("test.arr_i32", [-5, 6, -7], VT.INT32),
        ("test.arr_f32", [float(np.float32(x)) for x in (0.5, -1.25, 1e-3)], VT.FLOAT32),
        ("test.arr_bool", [True, False, True], VT.BOOL),
        ("test.arr_string", ["a", "", "▁the", "<0x0A>"], VT.STRING),
        ("test.arr_u64", [1, 2**63 + 5], VT.UINT64),
        ("test.arr_i64", [-(2**62), 2**62], VT.INT64),
        ("test.arr_f64", [1.5, -2.25e-300], VT.FLOAT64),
    ]
    for key, val, vt in arrays:
        w.add_key_value(key, val, VT.ARRAY, sub_type=vt)
    # Nested arrays: the writer infers inner element types from the Python values (int -> INT32
    # for small ints, str -> STRING); the reader test checks what the file says.
    nested = [
        ("test.nested_ints", [[1, 2, 3], [4], [5, 6]]),
        ("test.nested_strings", [["x", "yz"], ["w"]]),
        ("test.nested_deep", [[[1, 2], [3]], [[4]]]),
    ]
    for key, val in nested:
        w.add_array(key, val)
    # One tensor, so that the data section is placed with the custom alignment of 64.
    w.add_tensor("aligned", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Expected values, taken from the reader (types) and the inputs (values of nested arrays).
    r = gguf.GGUFReader(path)
    expected = {}
    nested_vals = dict(nested)
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types, value = read_back_value(field)
        if value is None:
            value = nested_vals[name]
        expected[name] = {"types": types, "value": value}
    with open(os.path.join(OUT, "metadata.expected.json"), "w") as f:
        aligned = r.get_tensor(0)
        assert aligned.name == "aligned" and aligned.data_offset % 64 == 0
        json.dump({"versions": VERSIONS, "version": 3, "alignment": 64,
                   "aligned_data_offset": int(aligned.data_offset),
                   "aligned_values": [float(v) for v in aligned.data.ravel()], "metadata": expected}, f,
                  indent=1, ensure_ascii=False)


def random_kquant_blocks(rng, qtype, n_blocks):
    """Random but valid K-quant blocks: random packed bits, small finite f16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    def f16_bytes(lo, hi):
        return rng.uniform(lo, hi, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype == QT.Q4_K:  # d | dmin | scales[12] | qs[128]
        raw[:, 0:2] = f16_bytes(1e-3, 5e-2)
        raw[:, 2:4] = f16_bytes(1e-3, 5e-2)
    elif qtype == QT.Q6_K:  # ql[128] | qh[64] | scales[16] | d
        raw[:, 208:210] = f16_bytes(-5e-2, 5e-2)
    else:
        raise ValueError(qtype)
    return raw


def write_tensors():
    path = os.path.join(OUT, "tensors.gguf")
    rng = np.random.default_rng(20240601)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_string("general.name", "formats fixture")

    # F32: a 3-D tensor (numpy shape is outermost first, as ours) and a 1-D one.
    w.add_tensor("f32_3d", rng.standard_normal((3, 5, 7)).astype(np.float32))
    w.add_tensor("f32_1d", rng.standard_normal(11).astype(np.float32))
    # F16 with the awkward values: subnormals, signed zero, inf, the largest finite.
    f16 = rng.standard_normal((5, 9)).astype(np.float16)
    f16.flat[:6] = np.array([6e-8, -6e-8, -0.0, np.inf, -np.inf, 65504], dtype=np.float16)
    w.add_tensor("f16", f16)
    bf16_src = rng.standard_normal((3, 13)).astype(np.float32) * 100
    w.add_tensor("bf16", gguf.quants.quantize(bf16_src, QT.BF16), raw_dtype=QT.BF16)
    for qt, rows, cols in [(QT.Q8_0, 5, 64), (QT.Q4_0, 7, 96), (QT.Q4_1, 3, 32)]:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        w.add_tensor(qt.name.lower(), gguf.quants.quantize(x, qt), raw_dtype=qt)
    for qt, rows in [(QT.Q4_K, 3), (QT.Q6_K, 5)]:
        cols = 512
        blocks = random_kquant_blocks(rng, qt, rows * cols // 256)
        w.add_tensor(qt.name.lower(), blocks.reshape(rows, -1), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    r = gguf.GGUFReader(path)
    entries, chunks, offset = [], [], 0
    for t in r.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).ravel()
        shape = [int(d) for d in reversed(t.shape.tolist())]  # reader gives ne[] innermost first
        assert values.size == int(np.prod(shape)), (t.name, values.size, shape)
        entries.append({"name": t.name, "type": t.tensor_type.name, "shape": shape,
                        "offset": offset, "count": int(values.size)})
        chunks.append(values.astype("<f4").tobytes())
        offset += int(values.size)
    with open(os.path.join(OUT, "tensors.expected.bin"), "wb") as f:
        f.write(b"".join(chunks))
    with open(os.path.join(OUT, "tensors.expected.json"), "w") as f:
        json.dump({"versions": VERSIONS, "tensors": entries}, f, indent=1)


def expected_of(tensors):
    return {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                   "values": [repr(float(v)) for v in t.float().flatten().tolist()]}
            for name, t in tensors.items()}


def write_safetensors():
    g = torch.Generator().manual_seed(7)
    small = {
        "a.f32": torch.randn(3, 5, generator=g, dtype=torch.float32),
        "b.f16": torch.randn(7, generator=g).to(torch.float16),
        "c.bf16": (torch.randn(2, 3, generator=g) * 1000).to(torch.bfloat16),
        "d.scalar": torch.tensor(1.5, dtype=torch.float32),
    }
    save_file(small, os.path.join(OUT, "small.safetensors"), metadata={"format": "pt", "note": "x"})
    with open(os.path.join(OUT, "small.expected.json"), "w") as f:
        json.dump({"versions": VERSIONS, "metadata": {"format": "pt", "note": "x"},
                   "tensors": expected_of(small)}, f, indent=1)

    shard_dir = os.path.join(OUT, "sharded")
    os.makedirs(shard_dir, exist_ok=True)
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.layers.0.w": torch.randn(4, 3, generator=g).to(torch.bfloat16),
            "model.embed": torch.randn(5, 2, generator=g, dtype=torch.float32),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.w": torch.randn(4, 3, generator=g).to(torch.float16),
        },
    }
    weight_map, all_tensors = {}, {}
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(shard_dir, fname), metadata={"format": "pt"})
        for name in tensors:
            weight_map[name] = fname
        all_tensors.update(tensors)
    total = sum(t.numel() * t.element_size() for t in all_tensors.values())
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(OUT, "sharded.expected.json"), "w") as f:
        json.dump({"versions": VERSIONS, "tensors": expected_of(all_tensors)}, f, indent=1)


def main():
    os.makedirs(OUT, exist_ok=True)
    write_metadata()
    write_tensors()
    write_safetensors()
    total = 0
    for root, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
