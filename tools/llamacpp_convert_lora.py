#!/usr/bin/env python3
"""Converts PEFT LoRA folders to GGUF LoRA files with llama.cpp's own convert_lora_to_gguf.py,
offline, for scripts/bench-vs-llamacpp.sh.

convert_lora_to_gguf.py wants the base model's Hugging Face config.json (from --base DIR or the
hub). Offline we have only the GGUF, so this writes a config.json for a Llama-family base from the
GGUF's metadata (the shapes, rope base, norm epsilon, vocabulary size, tied embeddings) into a
scratch folder and passes that as --base. It also lets the converter run on an older torch (Debian's
python3-torch 1.13): the conversion package names torch.float8_* dtypes at import time, which
torch < 2.1 lacks; stand-ins are added (no float8 tensor ever reaches them for a PEFT LoRA).

  tools/llamacpp_convert_lora.py --llamacpp LLAMA_CPP_DIR --base-gguf MODEL.gguf \
      [--outtype f32|f16|bf16|q8_0] PEFT_DIR=OUT.gguf [PEFT_DIR=OUT.gguf ...]

Run it with a Python that has torch, numpy, safetensors and transformers (the venv the bench
script makes); gguf comes from LLAMA_CPP_DIR/gguf-py.
"""
import argparse
import json
import os
import runpy
import sys
import tempfile


def hf_config_from_gguf(path):
    """A Hugging Face LlamaForCausalLM config.json dict from a Llama-family GGUF's metadata."""
    import gguf
    r = gguf.GGUFReader(path)

    def field(key, default=None):
        f = r.fields.get(key)
        if f is None:
            if default is None:
                raise SystemExit(f"{path}: no {key} in the GGUF metadata")
            return default
        v = f.parts[f.data[0]]
        return v.tolist()[0] if hasattr(v, "tolist") else v

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        raise SystemExit(f"{path}: architecture {arch!r}; this writes configs for llama only")
    p = lambda k, d=None: field(f"{arch}.{k}", d)
    hidden = int(p("embedding_length"))
    heads = int(p("attention.head_count"))
    tokens = r.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    names = {t.name for t in r.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(p("feed_forward_length")),
        "num_hidden_layers": int(p("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(p("attention.head_count_kv", heads)),
        "head_dim": int(p("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(p("context_length")),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(p("rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id", 2)),
        "torch_dtype": "float32",
    }


def patch_old_torch():
    import torch
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        if not hasattr(torch, name):
            # A distinct, hashable stand-in: dict keys and "dtype in (...)" tests keep working.
            setattr(torch, name, type(name, (), {"__repr__": lambda self, n=name: f"torch.{n}"})())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp", required=True, help="llama.cpp source folder")
    ap.add_argument("--base-gguf", required=True, help="the base model GGUF")
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("pairs", nargs="+", metavar="PEFT_DIR=OUT.gguf")
    a = ap.parse_args()

    src = os.path.abspath(a.llamacpp)
    script = os.path.join(src, "convert_lora_to_gguf.py")
    if not os.path.isfile(script):
        raise SystemExit(f"{script}: not found")
    sys.path[:0] = [os.path.join(src, "gguf-py"), src]
    patch_old_torch()

    with tempfile.TemporaryDirectory(prefix="hf_base_") as base:
        with open(os.path.join(base, "config.json"), "w") as f:
            json.dump(hf_config_from_gguf(a.base_gguf), f, indent=2)
        for pair in a.pairs:
            peft, sep, out = pair.partition("=")
            if not sep:
                raise SystemExit(f"{pair}: want PEFT_DIR=OUT.gguf")
            sys.argv = [script, "--base", base, "--outtype", a.outtype, "--outfile", out, peft]
            runpy.run_path(script, run_name="__main__")
            if not os.path.isfile(out):
                raise SystemExit(f"convert_lora_to_gguf.py wrote no {out}")


if __name__ == "__main__":
    main()
