#!/usr/bin/env python3
"""Makes the adapter inspection goldens (adapters/inspect.h) with numpy's float64 SVD of the dense
update dW = s * B @ A of every module, the way the LoRA paper's section 7 defines its measures.
No loraplex code is involved: the base weights come from the HF safetensors copy of stories260K,
the adapters are the PEFT fixtures under tests/fixtures/peft/stories260k.

Output: tests/fixtures/peft/stories260k/inspection.json
  {"format": "loraplex-inspection-golden/1", "numpy": VERSION,
   "adapters": {NAME: {"modules": [{"module", "rank", "singular_values", "fro_norm",
                                    "relative_norm", "effective_rank", "amplification"}, ...]}},
   "similarity": {"A:B": {MODULE: value, ...}, ...}}

Usage: python3 tools/make_inspection_goldens.py   (numpy and safetensors; tools/requirements-goldens.txt)
"""
import json
import math
import os

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "..", "shared", "models", "stories260K", "model.safetensors")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "peft", "stories260k")
ADAPTERS = ["all_linear", "qv", "rank64"]
PAIRS = [("all_linear", "qv"), ("all_linear", "all_linear"), ("qv", "rank64")]
PREFIX = "base_model.model."


def load_adapter(name):
    folder = os.path.join(FIXTURES, name)
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert not config.get("rank_pattern") and not config.get("alpha_pattern"), name
    assert not config.get("fan_in_fan_out"), name
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    modules = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        modules[module] = (a.astype(np.float64), b.astype(np.float64), scale)
    return modules


def order_key(module):
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    parts = module.split(".")
    return int(parts[2]), kinds.index(parts[-1])


def svd(module):
    a, b, scale = module
    dw = scale * (b @ a)
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return dw, u, s, vt.T


def inspect(modules, base):
    out = []
    for name in sorted(modules, key=order_key):
        a, _, _ = modules[name]
        r = a.shape[0]
        dw, u, s, v = svd(modules[name])
        w = base[name + ".weight"].astype(np.float64)
        fro = float(np.linalg.norm(dw))
        sigma = [float(x) for x in s[:r]] + [0.0] * max(0, r - len(s))
        sq = np.cumsum(s * s)
        eff = int(np.argmax(sq >= 0.99 * sq[-1]) + 1) if sq[-1] > 0 else 0
        p = min(r, len(s))
        proj = np.linalg.norm(u[:, :p].T @ w @ v[:, :p])
        out.append({
            "module": name,
            "rank": r,
            "singular_values": sigma,
            "fro_norm": fro,
            "relative_norm": fro / float(np.linalg.norm(w)),
            "effective_rank": eff,
            "amplification": fro / float(proj) if fro > 0 else 0.0,
        })
    return out


def similarity(m1, m2):
    out = {}
    for name in sorted(set(m1) & set(m2), key=order_key):
        r1, r2 = m1[name][0].shape[0], m2[name][0].shape[0]
        _, _, s1, v1 = svd(m1[name])
        _, _, s2, v2 = svd(m2[name])
        k = min(r1, r2, v1.shape[1], v2.shape[1])
        out[name] = float(np.linalg.norm(v1[:, :k].T @ v2[:, :k]) ** 2 / k)
    return out


def main():
    base = load_file(MODEL)
    adapters = {name: load_adapter(name) for name in ADAPTERS}
    golden = {
        "format": "loraplex-inspection-golden/1",
        "numpy": np.__version__,
        "adapters": {name: {"modules": inspect(m, base)} for name, m in adapters.items()},
        "similarity": {f"{x}:{y}": similarity(adapters[x], adapters[y]) for x, y in PAIRS},
    }
    path = os.path.join(FIXTURES, "inspection.json")
    with open(path, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
