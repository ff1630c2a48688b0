#!/usr/bin/env python3
"""Makes the HF PEFT golden fixtures the C++ adapter tests compare against.

Seeded random LoRA adapters are created with PEFT (get_peft_model + save_pretrained, exactly the
files a user would bring), and torch + transformers + peft compute the logits with each adapter
applied, and with it merged (merge_and_unload). No one on the team wrote this reference.

Outputs (relative to the repository root):
  tests/fixtures/peft/stories260k/<name>/   for ../shared/models/stories260K (HF copy, f32)
      adapter_config.json, adapter_model.safetensors   as saved by PEFT
      logits.json + logits.bin   all-position logits of 2 prompts: "<prompt>" with the adapter,
                                 "<prompt>_merged" with the adapter merged into the weights
  tests/fixtures/peft/stories260k/base_logits.{json,bin}   the same prompts without adapter
  tests/fixtures/peft/smollm2/<name>/       for SmolLM2-135M-Instruct (Q4_1 GGUF dequantized by
      transformers): adapter files (bf16, small ranks to keep the fixtures small), last-position
      logits of the first prompt and the top-20 of every position of both prompts.

The logits files use the format of tools/make_hf_goldens.py ("loraplex-golden-logits/1").

Every prompt entry also carries "greedy": PEFT's free-running greedy continuation of that prompt
(model.generate, do_sample=False, KV cache on, EOS never stops it), made with the adapter applied
for "<prompt>" entries and with the merged model for "<prompt>_merged" ones (stories260K: 40 new
tokens; SmolLM2: 32). Per step it records the raw top-1 logit and the top1 - top2 margin, so a
test can tell a step where two logits are within float noise (and an exact reproduction may
legitimately pick the other one) from a real divergence.

Usage: python3 tools/make_peft_goldens.py [--only stories|smollm2] [--out DIR]
(SmolLM2 needs scripts/fetch-model.sh to have run.) Seeds are fixed.
"""

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_goldens as hf  # noqa: E402  (shared fixture writer and helpers)

REPO_ROOT = hf.REPO_ROOT
OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "peft")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (LoraConfig kwargs, storage dtype, config edits applied after saving)
STORIES_ADAPTERS = {
    "qv": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), torch.float32, {}),
    "qv_f16": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), torch.float16, {}),
    "all_linear": (dict(r=4, lora_alpha=8, target_modules="all-linear"), torch.float32, {}),
    "rslora": (dict(r=16, lora_alpha=4, use_rslora=True,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), torch.float32, {}),
    # Keys match as suffixes at a "." boundary (PEFT's get_pattern_key). No two keys match one
    # module: PEFT itself resolves such overlaps differently when creating and when re-loading.
    "patterns": (dict(r=4, lora_alpha=8, target_modules=ALL7,
                      rank_pattern={"q_proj": 8, "layers.2.mlp.down_proj": 2},
                      alpha_pattern={"layers.1.self_attn.q_proj": 32, "v_proj": 2}),
                 torch.bfloat16, {}),
    "layers": (dict(r=4, lora_alpha=8, target_modules=ALL7, layers_to_transform=[0, 2, 4],
                    layers_pattern="layers"), torch.float32, {}),
    "regex": (dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.[13]\.self_attn\.(q|k)_proj"),
              torch.float32, {}),
    "rank1": (dict(r=1, lora_alpha=2, target_modules=ALL7), torch.float32, {}),
    "rank64": (dict(r=64, lora_alpha=64, target_modules=["q_proj", "v_proj"]), torch.float32, {}),
    # PEFT resets fan_in_fan_out to False for nn.Linear targets (with a warning) at load time; the
    # saved tensors are lora_A [r, in] / lora_B [out, r] either way. The config is edited after
    # saving so the fixture carries "fan_in_fan_out": true as a user's file might.
    "fan_in_fan_out": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                               "o_proj"]),
                       torch.float32, {"fan_in_fan_out": True}),
}
STORIES_PROMPTS = {
    "story": [1, 403, 407, 261, 378, 432, 383, 286, 261, 376],
    "random": [1] + [int(x) for x in np.random.default_rng(11).integers(3, 512, size=11)],
}

SMOLLM2_ADAPTERS = {
    "qv": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), torch.bfloat16, {}),
    "all_linear": (dict(r=2, lora_alpha=4, target_modules="all-linear"), torch.bfloat16, {}),
}
SMOLLM2_TEXTS = ["The capital of France is", "Once upon a time, a small robot"]


def peft_versions():
    import peft
    v = hf.versions()
    v["peft"] = peft.__version__
    return v


STORIES_GREEDY_TOKENS = 40
SMOLLM2_GREEDY_TOKENS = 32


@torch.no_grad()
def greedy_continuation(model, ids, n):
    """PEFT's free-running greedy continuation: n new tokens from model.generate (KV cache, the
    path a user runs), with EOS disabled so every config yields n tokens (the C++ side runs with
    ignore_eos). The generation config is built here in full so no checkpoint default (penalties,
    min length) can slip in."""
    from transformers import GenerationConfig
    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                          eos_token_id=None, pad_token_id=0, bos_token_id=None,
                          repetition_penalty=1.0, output_logits=True,
                          return_dict_in_generate=True)
    out = model.generate(input_ids=torch.tensor([ids], dtype=torch.long),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=gc)
    new = [int(t) for t in out.sequences[0, len(ids):]]
    rows = [step[0].float().numpy() for step in out.logits]  # raw logits, before any processor
    assert len(new) == n and len(rows) == n
    # generate() picks argmax of the processed scores; with no processors those are the raw
    # logits, so the recorded token must be their argmax.
    assert all(int(np.argmax(r)) == t for r, t in zip(rows, new)), "generate is not plain argmax"
    return {"max_new_tokens": n, "token_ids": new,
            "top_logit": [float(np.max(r)) for r in rows],
            "margin": [hf.margin(r) for r in rows],
            "how": "model.generate(do_sample=False, num_beams=1, eos disabled), KV cache"}


def sort_target_modules(out_dir):
    """PEFT keeps target_modules as a Python set and saves it in set order, which changes from
    one interpreter to the next (string hash randomisation); sorting makes reruns byte-identical."""
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        c = json.load(f)
    if isinstance(c.get("target_modules"), list):
        c["target_modules"] = sorted(c["target_modules"])
        with open(path, "w") as f:
            json.dump(c, f, indent=2)


def make_adapter(base, kwargs, dtype, edits, seed, out_dir):
    """Seeded random LoRA (A and B both non-zero), saved with save_pretrained; returns the model
    with the adapter exactly as saved (weights rounded to `dtype` and read back)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kwargs)
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                # Unit-variance deltas on unit-norm activations would swamp the tiny model; 0.2
                # keeps logits in a realistic range while every delta stays clearly visible.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                p.data = p.data.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    sort_target_modules(out_dir)
    if edits:
        path = os.path.join(out_dir, "adapter_config.json")
        with open(path) as f:
            c = json.load(f)
        c.update(edits)
        with open(path, "w") as f:
            json.dump(c, f, indent=2)
    # Reload from disk so the goldens are of the files as committed.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out_dir).eval()
    return loaded


def stories_base_for_generate():
    """stories260K (HF copy, f32, eager attention) for the tools that run generate() on any
    torch: Debian's torch 1.13 cannot import torch.distributed.fsdp on Python 3.11 (a dataclass
    default), which generate() probes for; nothing here is sharded, so the probe is answered."""
    import transformers.generation.utils as generation_utils
    from transformers import AutoModelForCausalLM

    generation_utils.is_fsdp_managed_module = lambda module: False
    src = os.path.join(hf.REPO_ROOT, "..", "shared", "models", "stories260K")
    return AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32,
                                                attn_implementation="eager").eval()


def make_stories(out_root, seed0=100):
    from transformers import AutoModelForCausalLM
    src = os.path.join(hf.REPO_ROOT, "..", "shared", "models", "stories260K")
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    root = os.path.join(out_root, "stories260k")
    header = {"generator": "tools/make_peft_goldens.py", "versions": peft_versions(),
              "model": "../shared/models/stories260K (HF copy)"}
    hf.write_logits_fixture(
        os.path.join(root, "base_logits.json"), header,
        [{"name": n, "token_ids": ids, "logits": hf.all_logits(base, ids)}
         for n, ids in STORIES_PROMPTS.items()])
    for i, (name, (kwargs, dtype, edits)) in enumerate(STORIES_ADAPTERS.items()):
        d = os.path.join(root, name)
        model = make_adapter(base, kwargs, dtype, edits, seed0 + i, d)
        prompts = [{"name": n, "token_ids": ids, "logits": hf.all_logits(model, ids),
                    "greedy": greedy_continuation(model, ids, STORIES_GREEDY_TOKENS)}
                   for n, ids in STORIES_PROMPTS.items()]
        merged = copy.deepcopy(model).merge_and_unload().eval()
        prompts += [{"name": n + "_merged", "token_ids": ids,
                     "logits": hf.all_logits(merged, ids),
                     "greedy": greedy_continuation(merged, ids, STORIES_GREEDY_TOKENS)}
                    for n, ids in STORIES_PROMPTS.items()]
        h = dict(header, adapter=name, seed=seed0 + i, lora_config=repr(kwargs),
                 stored_dtype=str(dtype))
        hf.write_logits_fixture(os.path.join(d, "logits.json"), h, prompts)


def make_smollm2(out_root, seed0=200, adapters=None, make=None,
                  generator="tools/make_peft_goldens.py"):
    """The SmolLM2 fixtures of `adapters` (default SMOLLM2_ADAPTERS: name -> (LoraConfig kwargs,
    dtype, config edits)), each made by make(base, kwargs, dtype, edits, seed, out_dir) (default
    make_adapter), which returns the PeftModel as saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    adapters = SMOLLM2_ADAPTERS if adapters is None else adapters
    make = make_adapter if make is None else make
    path = os.path.join(REPO_ROOT, "models", hf.SMOLLM2_FILE)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run scripts/fetch-model.sh first")
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # torch_dtype: the spelling transformers 4.46 (Debian's torch 1.13 venv) and newer both take.
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32,
                                                attn_implementation="eager").eval()
    if base.lm_head.weight.data_ptr() != base.get_input_embeddings().weight.data_ptr():
        # The GGUF ties lm_head to the embedding; transformers before 4.47 leaves it random.
        base.lm_head.weight = base.get_input_embeddings().weight
    root = os.path.join(out_root, "smollm2")
    header = {"generator": generator, "versions": peft_versions(),
              "model": "models/" + hf.SMOLLM2_FILE + " (dequantized to f32 by transformers)",
              "model_sha256": hf.sha256(path)}
    ids_list = [tok.encode(t, add_special_tokens=False) for t in SMOLLM2_TEXTS]
    for i, (name, (kwargs, dtype, edits)) in enumerate(adapters.items()):
        ad = os.path.join(root, name)
        model = make(base, kwargs, dtype, edits, seed0 + i, ad)
        h = dict(header, adapter=name, seed=seed0 + i, lora_config=repr(kwargs),
                 stored_dtype=str(dtype))
        # First prompt: last-position logits (+ top-20 everywhere); second: top-20 only would need
        # a second file, so both go in with last-position logits only of the first (size budget).
        prompts = []
        merged = copy.deepcopy(model).merge_and_unload().eval()
        for j, (text, ids) in enumerate(zip(SMOLLM2_TEXTS, ids_list)):
            g = greedy_continuation(model, ids, SMOLLM2_GREEDY_TOKENS)
            g["text"] = tok.decode(g["token_ids"])
            gm = greedy_continuation(merged, ids, SMOLLM2_GREEDY_TOKENS)
            gm["text"] = tok.decode(gm["token_ids"])
            print(f"smollm2 {name} p{j}: {g['text']!r}")
            prompts.append({"name": f"p{j}", "text": text, "token_ids": ids,
                            "logits": hf.all_logits(model, ids), "greedy": g,
                            "greedy_merged": gm})
        hf.write_logits_fixture(os.path.join(ad, "logits.json"), h, prompts[:1], last_only=True,
                                topk=20)
        hf.write_logits_fixture(os.path.join(ad, "top20.json"), h, prompts[1:], last_only=True,
                                topk=20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["stories", "smollm2"])
    ap.add_argument("--out", default=OUT,
                    help="output root (default tests/fixtures/peft); another folder lets a rerun "
                         "be compared with the committed fixtures byte for byte")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only in (None, "stories"):
        make_stories(args.out)
    if args.only in (None, "smollm2"):
        make_smollm2(args.out)


if __name__ == "__main__":
    main()
