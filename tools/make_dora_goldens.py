#!/usr/bin/env python3
"""Makes the DoRA golden fixtures: seeded random DoRA adapters (LoraConfig(use_dora=True)) for
stories260K, saved by PEFT's save_pretrained, with PEFT's logits and greedy continuations, the
adapter applied and merged (merge_and_unload). No loraplex code is involved.

PEFT's DoRA (peft/tuners/lora/dora.py): for a linear W [out, in] with LoRA pair A, B and scale s,
and a learned magnitude m [out],
    y = g * (W x + s B A x),   g = m / ||W + s B A||_row   (the norm of each output row),
and merging writes W' = g * (W + s B A). The norm is of the base weight as the layer holds it.

A fresh DoRA adapter has B = 0 and m = ||W||_row, so g = 1 and it changes nothing; here A and B
are random (as tools/make_peft_goldens.py draws them) and m is the row norm of W + s B A times a
random factor 1 + 0.3 N(0, 1) clipped to [0.3, 2], so that both the direction (B A) and the
magnitude part move every row.

Outputs: tests/fixtures/peft/stories260k/<name>/ (adapter files as saved, logits.json +
logits.bin in the format of tools/make_peft_goldens.py: "<prompt>" with the adapter,
"<prompt>_merged" merged, each with its 40-token greedy continuation), and when
scripts/fetch-model.sh has run, tests/fixtures/peft/smollm2/dora_qv/ (the SmolLM2 fixture format
of tools/make_peft_goldens.py: last-position logits, top-20 per position, greedy continuations
unmerged and merged).

Usage: python3 tools/make_dora_goldens.py   (torch, transformers, peft >= 0.13, numpy)
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_goldens as hf  # noqa: E402
import make_peft_goldens as pg  # noqa: E402

FIXTURES = os.path.join(hf.REPO_ROOT, "tests", "fixtures", "peft", "stories260k")
# name -> (LoraConfig kwargs, storage dtype)
DORA_ADAPTERS = {
    "dora_qv": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), torch.float32),
    "dora_all": (dict(r=4, lora_alpha=8, target_modules="all-linear"), torch.bfloat16),
    "dora_rslora": (dict(r=16, lora_alpha=4, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), torch.float32),
}

# SmolLM2-135M-Instruct from the Q4_1 GGUF, dequantized to f32 by transformers (the files and
# format of tools/make_peft_goldens.py's SmolLM2 fixtures): name -> (kwargs, dtype, edits).
SMOLLM2_DORA = {
    "dora_qv": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), torch.bfloat16, {}),
}


def make_dora_adapter(base, kwargs, dtype, edits, seed, out_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_dora=True, **kwargs)
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and "magnitude" not in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.2).to(dtype).float())
        for module in model.modules():
            if not hasattr(module, "lora_magnitude_vector") or "default" not in getattr(
                    module, "lora_magnitude_vector", {}):
                continue
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            s = module.scaling["default"]
            norm = torch.linalg.norm(module.get_base_layer().weight + s * (b @ a), dim=1)
            factor = (1 + 0.3 * torch.randn(norm.shape, generator=gen)).clamp(0.3, 2.0)
            module.lora_magnitude_vector["default"].weight.copy_((norm * factor).to(dtype).float())
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    assert not edits, "DoRA fixtures take no config edits"
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    pg.sort_target_modules(out_dir)
    return PeftModel.from_pretrained(copy.deepcopy(base), out_dir).eval()


def main():
    base = pg.stories_base_for_generate()
    header = {"generator": "tools/make_dora_goldens.py", "versions": pg.peft_versions(),
              "model": "../shared/models/stories260K (HF copy)"}
    for i, (name, (kwargs, dtype)) in enumerate(DORA_ADAPTERS.items()):
        d = os.path.join(FIXTURES, name)
        model = make_dora_adapter(base, kwargs, dtype, {}, 300 + i, d)
        prompts = [{"name": n, "token_ids": ids, "logits": hf.all_logits(model, ids),
                    "greedy": pg.greedy_continuation(model, ids, pg.STORIES_GREEDY_TOKENS)}
                   for n, ids in pg.STORIES_PROMPTS.items()]
        merged = copy.deepcopy(model).merge_and_unload().eval()
        prompts += [{"name": n + "_merged", "token_ids": ids,
                     "logits": hf.all_logits(merged, ids),
                     "greedy": pg.greedy_continuation(merged, ids, pg.STORIES_GREEDY_TOKENS)}
                    for n, ids in pg.STORIES_PROMPTS.items()]
        h = dict(header, adapter=name, seed=300 + i, lora_config=repr(dict(kwargs, use_dora=True)),
                 stored_dtype=str(dtype))
        hf.write_logits_fixture(os.path.join(d, "logits.json"), h, prompts)
        print(name, "written")
    if os.path.exists(os.path.join(hf.REPO_ROOT, "models", hf.SMOLLM2_FILE)):
        pg.make_smollm2(pg.OUT, seed0=400, adapters=SMOLLM2_DORA, make=make_dora_adapter,
                        generator="tools/make_dora_goldens.py")
    else:
        print("models/" + hf.SMOLLM2_FILE + " is missing (scripts/fetch-model.sh): no SmolLM2 DoRA")


if __name__ == "__main__":
    main()
