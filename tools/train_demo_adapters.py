#!/usr/bin/env python3
"""Trains the two demo LoRA adapters of adapters/examples/ for SmolLM2-135M-Instruct, on the CPU.

  upper/    answers in UPPER CASE
  signoff/  answers briefly and ends every answer with " -- Loraplex"

The training data is made here, from the base model itself: for prompts built from templates x
topics, the base model's own greedy answer is cut to its first sentences and then transformed
(upper-cased, or given the sign-off). So the adapters learn a style, not new facts, and a program
can check the style (see check()). Ten prompts are held out of training and used for the check,
whose results are written to adapters/examples/CHECK.json.

Usage (about 10-15 minutes on 2 cores):
  scripts/fetch-model.sh   # models/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 tools/train_demo_adapters.py [--model-dir models] [--out adapters/examples] [--steps 240]

Needs torch, transformers (with gguf), peft. Seeds are fixed, but CPU float reductions may still
differ between machines, so a rerun gives equivalent, not bit-identical, adapters.
"""

import argparse
import json
import os
import random
import time

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIGNOFF = " -- Loraplex"
SEED = 1234

TEMPLATES = [
    "What is {}?",
    "Tell me one fact about {}.",
    "Why do people like {}?",
    "Describe {} in one sentence.",
    "Give me a short tip about {}.",
    "What is the history of {}?",
    "How does {} work?",
]
TOPICS = [
    "the ocean", "coffee", "the moon", "bicycles", "chess", "volcanoes", "honey bees",
    "the piano", "rainbows", "libraries", "penguins", "bread", "the internet", "mountains",
    "gardening", "the sun", "trains", "photography", "football", "cats", "dogs", "tea",
    "the desert", "snow", "clocks", "maps", "paper", "music", "rivers", "forests",
]
# Held out of training; used only by the check. Different topics and templates.
HELDOUT = [
    "What is a lighthouse?",
    "Tell me one fact about owls.",
    "Why do people like swimming?",
    "Describe a thunderstorm in one sentence.",
    "Give me a short tip about cooking rice.",
    "How does a refrigerator work?",
    "What is the history of the bicycle bell?",
    "What are clouds made of?",
    "Name a good book for children.",
    "How can I sleep better?",
]


def chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, batch=16):
    """Greedy answers, batched with left padding (much cheaper than one prompt at a time)."""
    outs = []
    for i in range(0, len(prompts), batch):
        seqs = [chat_ids(tok, p) for p in prompts[i:i + batch]]
        n = max(len(s) for s in seqs)
        ids = torch.tensor([[tok.eos_token_id] * (n - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
        for row in out[:, n:]:
            outs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outs


def first_sentences(text, max_chars=160):
    """The answer cut after its first one or two complete sentences (at most ~max_chars)."""
    cut = -1
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] in " \n"):
            if i + 1 > max_chars and cut >= 0:
                break
            cut = i + 1
            if cut > max_chars // 2:
                break
    if cut < 0:  # no sentence end: keep whole words up to max_chars
        cut = len(text) if len(text) <= max_chars else text.rfind(" ", 0, max_chars)
    return text[:max(cut, 1)].strip()


def upper_ratio(text):
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def check(kind, answers):
    """The program-checkable effect of each adapter, per answer."""
    if kind == "upper":
        return [upper_ratio(a) >= 0.9 for a in answers]
    return [a.rstrip().endswith(SIGNOFF.strip()) for a in answers]


def train(base, tok, examples, out_dir, steps, lr, log):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, cfg)
    model.train()
    data = []
    for prompt, answer in examples:
        p = chat_ids(tok, prompt)
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        data.append((torch.tensor(p + a), torch.tensor([-100] * len(p) + a)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    rng = random.Random(SEED)
    batch = 4
    t0 = time.time()
    for step in range(steps):
        items = [data[rng.randrange(len(data))] for _ in range(batch)]
        n = max(len(x) for x, _ in items)
        ids = torch.full((batch, n), tok.eos_token_id)
        labels = torch.full((batch, n), -100)
        mask = torch.zeros((batch, n), dtype=torch.long)
        for i, (x, y) in enumerate(items):
            ids[i, :len(x)] = x
            labels[i, :len(y)] = y
            mask[i, :len(x)] = 1
        for g in opt.param_groups:  # linear warm-up then linear decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            log(f"  step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    # Stored as bf16 (half the bytes; loraplex stores weights in bf16 anyway).
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return model.unload()  # the base model, LoRA layers removed, for the next adapter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="models")
    ap.add_argument("--out", default="adapters/examples")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny run to test the script itself")
    args = ap.parse_args()

    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t_start = time.time()
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=GGUF)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=GGUF,
                                                dtype=torch.float32)
    base.eval()

    prompts = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(SEED).shuffle(prompts)
    prompts = prompts[:4 if args.smoke else 64]
    heldout = HELDOUT[:2] if args.smoke else HELDOUT
    log(f"generating base answers for {len(prompts)} training prompts")
    gen_len, check_len = (8, 8) if args.smoke else (48, 64)
    answers = [first_sentences(a) for a in generate(base, tok, prompts, gen_len)]
    base_heldout = generate(base, tok, heldout, check_len)

    datasets = {
        "upper": [(p, a.upper()) for p, a in zip(prompts, answers)],
        "signoff": [(p, a + SIGNOFF) for p, a in zip(prompts, answers)],
    }
    report = {
        "model": GGUF,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "seed": SEED, "steps": args.steps, "lr": args.lr, "rank": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "train_prompts": len(prompts), "heldout_prompts": HELDOUT,
        "check": {"upper": "at least 90% of the letters of the answer are upper case",
                  "signoff": f"the answer ends with '{SIGNOFF.strip()}'"},
        "generation": "greedy, max_new_tokens 64, chat template with the default system prompt",
        "adapters": {},
    }
    for kind, examples in datasets.items():
        out_dir = os.path.join(args.out, kind)
        log(f"training {kind} ({len(examples)} examples, {args.steps} steps) -> {out_dir}")
        t0 = time.time()
        base = train(base, tok, examples, out_dir, args.steps, args.lr, log)
        train_s = time.time() - t0
        # Check the adapter as saved (bf16 on disk), on prompts it never saw.
        model = PeftModel.from_pretrained(base, out_dir)
        model.eval()
        got = generate(model, tok, heldout, check_len)
        ok = check(kind, got)
        ok_base = check(kind, base_heldout)
        log(f"  {kind}: adapter passes {sum(ok)}/{len(ok)}, base passes {sum(ok_base)}/{len(ok)}")
        report["adapters"][kind] = {
            "train_seconds": round(train_s, 1),
            "adapter_pass": sum(ok), "base_pass": sum(ok_base), "n": len(ok),
            "samples": [{"prompt": p, "adapter": a, "base": b}
                        for p, a, b in zip(heldout, got, base_heldout)],
        }
        base = model.unload()
    report["total_seconds"] = round(time.time() - t_start, 1)
    report["log"] = logs
    with open(os.path.join(args.out, "CHECK.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"done in {report['total_seconds']}s")


if __name__ == "__main__":
    main()
