#!/usr/bin/env python3
"""Writes a PEFT LoRA folder with random weights for a Llama-family base, for benchmarks.

The folder is exactly what PEFT's save_pretrained writes for a LoRA (adapter_config.json +
adapter_model.safetensors, keys base_model.model.model.layers.N.<mlp|self_attn>.<module>.lora_A/B
.weight), so the server, `loraplex bench --make-adapters` and PEFT itself can load it. Shapes come
from the base model's config.json or GGUF metadata (or SmolLM2-135M's when neither is given).
Weights are N(0, std) with lora_B non-zero (PEFT initialises B to zero, which would make the
adapter a no-op and hide its cost from nothing but the output). Needs numpy only (gguf for a GGUF --model).

--dora adds PEFT's DoRA magnitude per module (lora_magnitude_vector [out], uniform in [0.5, 1.5])
and sets use_dora; A and B are the same as without it for the same seed, so the two folders cost
the same LoRA work and differ only by DoRA's (for benchmarks: the magnitudes are not fitted to
the base, so the outputs mean nothing).

  tools/make_random_adapter.py OUT_DIR --rank 16 --targets q_proj,k_proj,v_proj,o_proj \
      [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--dtype bf16|f16|f32] [--seed 0] [--dora]
"""
import argparse
import json
import os

import numpy as np

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2_135M = dict(hidden=576, heads=9, kv_heads=3, inter=1536, layers=30)


def shapes_from_model(path):
    if path is None:
        return dict(SMOLLM2_135M)
    if os.path.isdir(path):
        c = json.load(open(os.path.join(path, "config.json")))
        return dict(hidden=c["hidden_size"], heads=c["num_attention_heads"],
                    kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                    inter=c["intermediate_size"], layers=c["num_hidden_layers"])
    import gguf  # only for GGUF bases
    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def get(key):
        f = r.fields[f"{arch}.{key}"]
        return int(f.parts[-1][0])
    return dict(hidden=get("embedding_length"), heads=get("attention.head_count"),
                kv_heads=get("attention.head_count_kv"), inter=get("feed_forward_length"),
                layers=get("block_count"))


def to_bf16_bits(x):
    """f32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors, dtype):
    """The safetensors layout (8-byte little-endian header length, JSON header, raw data), written
    here because safetensors.numpy cannot express bfloat16."""
    names = sorted(tensors)
    blobs, header, offset = [], {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        x = tensors[name]
        if dtype == "bf16":
            data, tag = to_bf16_bits(x).tobytes(), "BF16"
        elif dtype == "f16":
            data, tag = x.astype(np.float16).tobytes(), "F16"
        else:
            data, tag = x.astype(np.float32).tobytes(), "F32"
        header[name] = {"dtype": tag, "shape": list(x.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def module_dims(s, module):
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    return {"q_proj": (s["hidden"], s["hidden"]), "k_proj": (s["hidden"], kv),
            "v_proj": (s["hidden"], kv), "o_proj": (s["hidden"], s["hidden"]),
            "gate_proj": (s["hidden"], s["inter"]), "up_proj": (s["hidden"], s["inter"]),
            "down_proj": (s["inter"], s["hidden"])}[module]  # (in, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M shapes)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 * rank)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma list of modules, or all-linear")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dora", action="store_true", help="a DoRA adapter (use_dora, magnitudes)")
    a = ap.parse_args()

    targets = ALL if a.targets == "all-linear" else a.targets.split(",")
    for t in targets:
        if t not in ALL:
            ap.error(f"--targets: unknown module '{t}'")
    s = shapes_from_model(a.model)
    rng = np.random.default_rng(a.seed)
    tensors = {}
    for layer in range(s["layers"]):
        for m in targets:
            fin, fout = module_dims(s, m)
            block = "self_attn" if m in ATTN else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, a.std, (a.rank, fin)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, a.std, (fout, a.rank)).astype(np.float32)
    if a.dora:  # drawn after every A and B, so those stay the seed's
        for key in sorted({k.rsplit(".lora_", 1)[0] for k in tensors}):
            fout = tensors[f"{key}.lora_B.weight"].shape[0]
            tensors[f"{key}.lora_magnitude_vector"] = rng.uniform(0.5, 1.5, fout).astype(np.float32)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "adapter_model.safetensors")
    write_safetensors(path, tensors, a.dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": a.rank,
        "lora_alpha": a.alpha if a.alpha is not None else 2 * a.rank,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": a.dora, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "rank_pattern": {}, "alpha_pattern": {},
    }
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{a.out}: rank {a.rank} on {','.join(targets)}, {s['layers']} layers, "
          f"{os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
