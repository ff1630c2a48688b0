#!/usr/bin/env python3
"""Makes the rank compression goldens (AdapterLoadOptions::compress_rank, adapters/low_rank.h) with
numpy's float64 SVD of the dense update dW = s * B @ A of every module: the best rank-k
approximation (Eckart-Young) dW_k = U_k S_k V_k^T, saved as a plain PEFT adapter of rank k, and
its relative Frobenius error. No loraplex code is involved.

With torch, transformers and peft importable (--logits), PEFT's logits of each truncated adapter on
stories260K are written beside it too, in the format of tools/make_peft_goldens.py, so a test can
compare what loraplex serves for "<adapter> compressed to rank k" against PEFT running the
numpy-truncated update.

Outputs, under tests/fixtures/peft/stories260k/compressed/:
  compression.json       {"format": "loraplex-compression-golden/1", "numpy": VERSION,
                          "adapters": {"<adapter>_r<k>": {"adapter", "max_rank", "relative_error",
                                       "modules": [{"module", "trained_rank", "rank",
                                                    "relative_error"}, ...]}}}
  <adapter>_r<k>/        adapter_config.json (r = lora_alpha = k, so the scale is 1) and
                         adapter_model.safetensors (lora_A = S_k^1/2 V_k^T, lora_B = U_k S_k^1/2,
                         f32); with --logits also logits.json + logits.bin

Usage: python3 tools/make_compression_goldens.py [--logits]
(numpy and safetensors; --logits also torch, transformers and peft)
"""
import argparse
import json
import math
import os

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "peft", "stories260k")
OUT = os.path.join(FIXTURES, "compressed")
# (fixture adapter, rank to compress to)
CASES = [("rank64", 8), ("all_linear", 2)]
PREFIX = "base_model.model."


def order_key(module):
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    parts = module.split(".")
    return int(parts[2]), kinds.index(parts[-1])


def truncate(name, k):
    folder = os.path.join(FIXTURES, name)
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert not config.get("rank_pattern") and not config.get("alpha_pattern"), name
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out_tensors, modules = {}, []
    discarded = total = 0.0
    for key in sorted((x for x in tensors if x.endswith(".lora_A.weight")),
                      key=lambda x: order_key(x[len(PREFIX):-len(".lora_A.weight")])):
        module = key[len(PREFIX):-len(".lora_A.weight")]
        a = tensors[key].astype(np.float64)
        b = tensors[key.replace("lora_A", "lora_B")].astype(np.float64)
        dw = scale * (b @ a)
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        kept = min(k, r, len(s))
        root = np.sqrt(s[:kept])
        out_tensors[key] = (root[:, None] * vt[:kept]).astype(np.float32)
        out_tensors[key.replace("lora_A", "lora_B")] = (u[:, :kept] * root[None, :]).astype(
            np.float32)
        d, t = float(np.sum(s[kept:] ** 2)), float(np.sum(s ** 2))
        discarded += d
        total += t
        modules.append({"module": module, "trained_rank": r, "rank": kept,
                        "relative_error": math.sqrt(d / t) if t > 0 else 0.0})
    case = f"{name}_r{k}"
    d = os.path.join(OUT, case)
    os.makedirs(d, exist_ok=True)
    config.update({"r": k, "lora_alpha": k, "use_rslora": False})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(out_tensors, os.path.join(d, "adapter_model.safetensors"))
    os.chmod(os.path.join(d, "adapter_model.safetensors"), 0o644)
    return case, {"adapter": name, "max_rank": k,
                  "relative_error": math.sqrt(discarded / total) if total > 0 else 0.0,
                  "modules": modules}


def readable_by_peft(folder):
    """The folder as the installed PEFT can read it: an older PEFT refuses config keys newer ones
    wrote (keys it lacks are features it lacks, and these adapters use none of them), so a copy
    without them goes to a temporary folder."""
    import dataclasses
    import shutil
    import tempfile

    from peft import LoraConfig
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    unknown = [k for k in config if k not in known]
    # Metadata (peft_version) and parameters of features that are off (qalora_group_size) may
    # have values; a feature that is on may not.
    on = [k for k in unknown if k not in ("peft_version", "qalora_group_size")
          and config[k] not in (None, False, {}, [])]
    assert not on, on
    if not unknown:
        return folder
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(folder, "adapter_model.safetensors"), tmp)
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if k in known}, f)
    return tmp


def write_logits(cases):
    """PEFT's logits (unmerged and merged) of each truncated adapter, as make_peft_goldens.py
    writes them for the other stories260K fixtures."""
    import copy
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_hf_goldens as hf
    import make_peft_goldens as pg

    src = os.path.join(ROOT, "..", "shared", "models", "stories260K")
    base = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32,
                                                attn_implementation="eager").eval()
    header = {"generator": "tools/make_compression_goldens.py", "versions": pg.peft_versions(),
              "model": "../shared/models/stories260K (HF copy)"}
    for case in cases:
        d = os.path.join(OUT, case)
        model = PeftModel.from_pretrained(copy.deepcopy(base), readable_by_peft(d)).eval()
        prompts = [{"name": n, "token_ids": ids, "logits": hf.all_logits(model, ids)}
                   for n, ids in pg.STORIES_PROMPTS.items()]
        merged = copy.deepcopy(model).merge_and_unload().eval()
        prompts += [{"name": n + "_merged", "token_ids": ids,
                     "logits": hf.all_logits(merged, ids)}
                    for n, ids in pg.STORIES_PROMPTS.items()]
        hf.write_logits_fixture(os.path.join(d, "logits.json"), dict(header, adapter=case),
                                prompts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logits", action="store_true", help="also PEFT's logits (needs torch)")
    args = ap.parse_args()
    golden = {"format": "loraplex-compression-golden/1", "numpy": np.__version__, "adapters": {}}
    for name, k in CASES:
        case, entry = truncate(name, k)
        golden["adapters"][case] = entry
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "compression.json")
    with open(path, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print("wrote", path)
    if args.logits:
        write_logits(list(golden["adapters"]))
        print("wrote PEFT logits for", ", ".join(golden["adapters"]))


if __name__ == "__main__":
    main()
