#!/usr/bin/env python3
"""Writes tests/fixtures/tiny_llama/mistral_window/model.gguf: the tiny random Mistral of that folder
(sliding_window 8) as a GGUF file, the way llama.cpp's convert_hf_to_gguf.py lays out a Mistral:

  - general.architecture "llama" (llama.cpp converts MistralForCausalLM as a llama; the gguf package
    has no plain "mistral" architecture), hyperparameters under "llama.*";
  - the window under "llama.attention.sliding_window" (GGUFWriter.add_sliding_window, the key
    llama.cpp defines for it);
  - q_proj / k_proj rows permuted for adjacent-pair RoPE (llama.cpp's LlamaModel.permute, with the KV
    head count for k_proj), every tensor F32, names blk.N.attn_q ... as gguf's tensor map gives them.

No tokenizer is written (the tests load it with require_tokenizer = false). The transformers logits
in the same folder (logits.json) are the reference: the GGUF must reproduce them, window included.

Needs only numpy, safetensors and gguf (no torch). Regenerate from the repository root:
  python3 tools/make_mistral_gguf.py
"""

import importlib.metadata
import json
import os
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tiny_llama",
                   "mistral_window")


def permute(w, n_head):
    """Rows of each head reordered from HF's rotate-half halves to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    with open(os.path.join(DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"], cfg
    t = load_file(os.path.join(DIR, "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(os.path.join(DIR, "model.gguf"), "llama")
    versions = {"gguf": importlib.metadata.version("gguf"), "numpy": np.__version__,
                "safetensors": importlib.metadata.version("safetensors"),
                "python": sys.version.split()[0], "script": "tools/make_mistral_gguf.py"}
    w.add_name("tiny random Mistral, sliding_window 8 (loraplex test fixture)")
    w.add_description(json.dumps(versions, sort_keys=True))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_sliding_window(cfg["sliding_window"])

    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for key in sorted(t):
        a = np.ascontiguousarray(t[key].astype(np.float32))
        parts = key.split(".")
        if key == "lm_head.weight":
            name = "output.weight"
        elif parts[1] == "layers":
            i, mod = parts[2], ".".join(parts[3:-1])
            name = f"blk.{i}.{layer[mod]}.weight"
            if mod == "self_attn.q_proj":
                a = permute(a, n_head)
            elif mod == "self_attn.k_proj":
                a = permute(a, n_kv)
        else:
            name = names[parts[1]] + ".weight"
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", os.path.join(DIR, "model.gguf"), versions)


if __name__ == "__main__":
    main()
