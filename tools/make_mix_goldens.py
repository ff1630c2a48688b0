#!/usr/bin/env python3
"""Makes the weighted adapter mix goldens: PEFT's logits on stories260K for a request that names
several adapters with weights, delta = sum_i w_i * s_i * B_i A_i per module (a module an adapter
lacks contributes nothing). PEFT builds the mix itself, with add_weighted_adapter(...,
combination_type="cat"): lora_A of the new adapter is the rows w_i * s_i * A_i stacked, lora_B
the columns B_i side by side, at scale 1. No loraplex code is involved.

Outputs: tests/fixtures/peft/stories260k/mixes/<name>/logits.json + logits.bin (the format of
tools/make_peft_goldens.py; prompts "<prompt>" with the mix applied and "<prompt>_merged" with
it merged by merge_and_unload, each with PEFT's free-running greedy continuation of 40 tokens as
tools/make_peft_goldens.py records it), and mixes.json naming each mix's adapters and weights.

Usage: python3 tools/make_mix_goldens.py   (torch, transformers, peft, numpy, safetensors)
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_goldens as hf  # noqa: E402
import make_peft_goldens as pg  # noqa: E402
from make_compression_goldens import readable_by_peft  # noqa: E402

FIXTURES = os.path.join(hf.REPO_ROOT, "tests", "fixtures", "peft", "stories260k")
OUT = os.path.join(FIXTURES, "mixes")
# name -> [(fixture adapter, weight), ...]
MIXES = {
    # Different ranks and modules (qv: r=8 on q, v; all_linear: r=4 on all seven), one weight
    # negative: the example weights.
    "qv_all": [("qv", 0.7), ("all_linear", -0.4)],
    # Three adapters, one with rsLoRA scaling, one on layers 0, 2 and 4 only. PEFT makes the cat
    # adapter's config from the first adapter's (keeping its use_rslora and layers_to_transform,
    # with r = lora_alpha = the summed rank), so the first must use neither: here rank1, on all
    # seven modules of every layer. (Not "patterns": PEFT 0.13's cat sizes the new adapter from
    # each config's r, not its rank_pattern.)
    "three": [("rank1", -1.0), ("rslora", 0.5), ("layers", 1.5)],
}


def main():
    from peft import PeftModel

    base = pg.stories_base_for_generate()
    header = {"generator": "tools/make_mix_goldens.py", "versions": pg.peft_versions(),
              "model": "../shared/models/stories260K (HF copy)"}
    index = {"format": "loraplex-mix-golden/1", "mixes": {}}
    for name, parts in MIXES.items():
        model = None
        for adapter, _ in parts:
            folder = readable_by_peft(os.path.join(FIXTURES, adapter))
            if model is None:
                model = PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name=adapter)
            else:
                model.load_adapter(folder, adapter_name=adapter)
        model.add_weighted_adapter([a for a, _ in parts], [w for _, w in parts], "mix",
                                   combination_type="cat")
        model.set_adapter("mix")
        model.eval()
        prompts = [{"name": n, "token_ids": ids, "logits": hf.all_logits(model, ids),
                    "greedy": pg.greedy_continuation(model, ids, pg.STORIES_GREEDY_TOKENS)}
                   for n, ids in pg.STORIES_PROMPTS.items()]
        # Only the mix may be merged: drop the others first.
        for adapter, _ in parts:
            model.delete_adapter(adapter)
        merged = copy.deepcopy(model).merge_and_unload().eval()
        prompts += [{"name": n + "_merged", "token_ids": ids, "logits": hf.all_logits(merged, ids),
                     "greedy": pg.greedy_continuation(merged, ids, pg.STORIES_GREEDY_TOKENS)}
                    for n, ids in pg.STORIES_PROMPTS.items()]
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        hf.write_logits_fixture(os.path.join(d, "logits.json"), dict(header, mix=name), prompts)
        index["mixes"][name] = [{"adapter": a, "weight": w} for a, w in parts]
    with open(os.path.join(OUT, "mixes.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
