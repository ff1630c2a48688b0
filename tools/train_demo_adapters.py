#!/usr/bin/env python3
"""Trains the two demo LoRA adapters of adapters/examples/ for SmolLM2-135M-Instruct, on the CPU.

  upper/    answers in UPPER CASE
  signoff/  answers briefly and ends every answer with " -- Loraplex"

The training data is made here, from the base model itself: for prompts built from templates x
topics, loraplex-generate (our C++ binary, ~1 s per answer, far faster than HF generate on a CPU)
writes the base model's greedy answer, which is cut to its first sentence or two and then
transformed (upper-cased, or given the sign-off). So the adapters learn a style, not new facts, and
a program can check the style (see check()). Four validation prompts decide when training may
stop; ten other held-out prompts, never seen before the end, give the final check, run through
loraplex-generate --adapter (so it checks what loraplex serves), whose results are written to
adapters/examples/CHECK.json.

Why it is fast enough on two shared cores: LoRA sits only on the last --lora-layers decoder layers
(PEFT layers_to_transform), so the first layers are frozen and see no adapter. Their output for each
training sequence is computed once, without gradients, and cached; every training step then runs
only the last layers, the final norm and lm_head on the answer positions.

Usage (about 10-20 minutes on 2 shared cores):
  scripts/fetch-model.sh   # models/SmolLM2-135M-Instruct.Q4_1.gguf
  cmake -S . -B build-demo -G Ninja -DCMAKE_BUILD_TYPE=Release
  ninja -C build-demo loraplex-generate
  nice -n 5 python3 tools/train_demo_adapters.py [--generate build-demo/client/loraplex-generate]

Needs torch, transformers (with gguf), peft. Seeds are fixed, but CPU float reductions may still
differ between machines, so a rerun gives equivalent, not bit-identical, adapters.
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import subprocess
import time

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF is its Q4_1 quantization
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
# Decide when training may stop (never trained on, never in the final check).
VALIDATION = [
    "What is a volcano made of?",
    "Tell me something about elephants.",
    "Why is the sky blue?",
    "Give me a tip for learning a language.",
]
# Held out of training and validation; used only by the final check (and by
# tests/adapters/demo_adapters_test.cc, which uses the first three).
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
TARGETS = ["q_proj", "v_proj"]
CHECK_TOKENS = 64


def upper_ratio(text):
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def check(kind, answers):
    """The program-checkable effect of each adapter, per answer."""
    if kind == "upper":
        return [upper_ratio(a) >= 0.9 for a in answers]
    return [a.rstrip().endswith(SIGNOFF.strip()) for a in answers]


def first_sentences(text, max_chars=120):
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


class Generator:
    """Runs loraplex-generate: greedy answers to chat prompts, optionally through an adapter."""

    def __init__(self, binary, model):
        self.binary, self.model = binary, model

    def one(self, prompt, max_tokens, adapter=None):
        cmd = [self.binary, "--model", self.model, "--chat", prompt, "--max-tokens",
               str(max_tokens), "--json"]
        if adapter:
            cmd += ["--adapter", adapter]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def many(self, prompts, max_tokens, adapter=None, jobs=2):
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda p: self.one(p, max_tokens, adapter), prompts))


def tidy_saved(out_dir):
    """Drops PEFT's placeholder model card and names the HF base model (save_pretrained records the
    local folder the GGUF was read from, which means nothing elsewhere)."""
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = BASE_MODEL
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def has_output_weight(path):
    import gguf
    return any(t.name == "output.weight" for t in gguf.GGUFReader(path).tensors)


def chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


@contextlib.contextmanager
def only_layers(llama, layers, norm=True):
    """Runs the decoder (LlamaModel) with a slice of its layers, optionally without the final norm.

    Uses the model's own forward (RoPE, causal mask) rather than a copy of it.
    """
    saved_layers, saved_norm = llama.layers, llama.norm
    llama.layers = torch.nn.ModuleList(layers)
    if not norm:
        llama.norm = torch.nn.Identity()
    try:
        yield
    finally:
        llama.layers, llama.norm = saved_layers, saved_norm


def pad(rows, value):
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n) + tuple(rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@torch.no_grad()
def prefix_states(llama, first, seqs, batch=16):
    """Output of the first `first` decoder layers for each sequence: [len, hidden] each.

    Batched with right padding: causal attention keeps the pads out of the real positions.
    """
    states = []
    with only_layers(llama, list(llama.layers[:first]), norm=False):
        for i in range(0, len(seqs), batch):
            part = [torch.tensor(s) for s in seqs[i:i + batch]]
            mask = pad([torch.ones(len(s), dtype=torch.long) for s in part], 0)
            out = llama(input_ids=pad(part, 0), attention_mask=mask,
                        use_cache=False).last_hidden_state
            states += [out[j, :len(s)] for j, s in enumerate(part)]
    return states


def train(base, tok, gen, kind, examples, out_dir, args, log):
    """Trains one adapter; returns (base model with LoRA removed, steps run, history)."""
    from peft import LoraConfig, get_peft_model

    n_layers = base.config.num_hidden_layers
    first = n_layers - args.lora_layers
    torch.manual_seed(SEED)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM", target_modules=args.targets.split(","),
                     layers_to_transform=list(range(first, n_layers)))
    model = get_peft_model(base, cfg)
    llama, lm_head = model.base_model.model.model, model.base_model.model.lm_head

    seqs, starts = [], []
    for prompt, answer in examples:
        p = chat_ids(tok, prompt)
        a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs.append(p + a)
        starts.append(len(p))
    t0 = time.time()
    cached = prefix_states(llama, first, seqs)
    log(f"  cached layer-{first} states of {len(seqs)} sequences "
        f"(max {max(map(len, seqs))} tokens) in {time.time() - t0:.0f}s")

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    rng = random.Random(SEED)
    order = []
    history = []
    t0 = time.time()
    step = 0
    while step < args.max_steps:
        if len(order) < args.batch:  # epochs of shuffled examples
            more = list(range(len(seqs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:args.batch], order[args.batch:]
        h = pad([cached[i] for i in idx], 0.0)
        mask = pad([torch.ones(len(seqs[i]), dtype=torch.long) for i in idx], 0)
        # Position t predicts token t+1; only answer tokens (and the final EOS) are targets.
        rows, cols, targets = [], [], []
        for b, i in enumerate(idx):
            for t in range(starts[i] - 1, len(seqs[i]) - 1):
                rows.append(b)
                cols.append(t)
                targets.append(seqs[i][t + 1])
        for g in opt.param_groups:  # short linear warm-up, then constant
            g["lr"] = args.lr * min(1.0, (step + 1) / 10)
        with only_layers(llama, list(llama.layers[first:])):
            out = llama(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state
        logits = lm_head(out[rows, cols])
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if step % 5 == 0 or step == 1:
            log(f"  step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if step % args.check_every == 0 or step == args.max_steps:
            model.save_pretrained(out_dir)
            tidy_saved(out_dir)
            answers = [r["text"] for r in gen.many(VALIDATION, CHECK_TOKENS, out_dir)]
            ok = check(kind, answers)
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "validation_pass": sum(ok), "seconds": round(time.time() - t0, 1)})
            log(f"  step {step}: validation passes {sum(ok)}/{len(ok)}: {answers[0]!r}")
            if all(ok) and step >= args.min_steps:
                break
    model.eval()
    return model.unload(), step, history


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="models")
    ap.add_argument("--generate", default="build-demo/client/loraplex-generate")
    ap.add_argument("--out", default="adapters/examples")
    ap.add_argument("--kinds", default="upper,signoff")
    ap.add_argument("--train-prompts", type=int, default=96)
    ap.add_argument("--lora-layers", type=int, default=12, help="LoRA on the last N layers")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-steps", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--check-every", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated modules")
    args = ap.parse_args()

    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t_start = time.time()
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    gguf = os.path.join(args.model_dir, GGUF)
    gen = Generator(args.generate, gguf)
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=GGUF)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=GGUF,
                                                torch_dtype=torch.float32)
    if not has_output_weight(gguf):
        # The GGUF ties lm_head to the embedding; transformers before 4.47 leaves it random.
        base.lm_head.weight = base.get_input_embeddings().weight
    base.eval()
    log(f"loaded {GGUF} in {time.time() - t_start:.0f}s")

    prompts = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(SEED).shuffle(prompts)
    prompts = prompts[:args.train_prompts]
    assert not set(prompts) & set(VALIDATION + HELDOUT)
    t0 = time.time()
    results = gen.many(prompts, 48)
    # The adapters are trained on HF's tokenization and served on loraplex's: they must agree.
    for p, r in zip(prompts[:4], results):
        if chat_ids(tok, p) != r["prompt_token_ids"]:
            raise RuntimeError(f"HF and loraplex tokenize the chat prompt {p!r} differently")
    answers = [first_sentences(r["text"].strip()) for r in results]
    log(f"generated {len(prompts)} base answers with loraplex-generate in {time.time() - t0:.0f}s")
    base_heldout = [r["text"] for r in gen.many(HELDOUT, CHECK_TOKENS)]

    datasets = {
        "upper": [(p, a.upper()) for p, a in zip(prompts, answers)],
        "signoff": [(p, a + SIGNOFF) for p, a in zip(prompts, answers)],
    }
    n_layers = base.config.num_hidden_layers
    check_path = os.path.join(args.out, "CHECK.json")
    report = {}
    if os.path.exists(check_path):  # keep the other adapter's results when training one kind
        with open(check_path) as f:
            report = json.load(f)
    report.update({
        "model": GGUF,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "seed": SEED, "lr": args.lr, "batch": args.batch, "rank": args.rank,
        "lora_alpha": args.alpha, "target_modules": args.targets.split(","),
        "layers_to_transform": [n_layers - args.lora_layers, n_layers - 1],
        "train_prompts": len(prompts), "validation_prompts": VALIDATION, "heldout_prompts": HELDOUT,
        "check": {"upper": "at least 90% of the letters of the answer are upper case",
                  "signoff": f"the answer ends with '{SIGNOFF.strip()}'"},
        "generation": f"loraplex-generate --chat PROMPT --max-tokens {CHECK_TOKENS} (greedy, bf16 "
                      "weights, chat template with its default system prompt)",
    })
    report.setdefault("adapters", {})
    for kind in args.kinds.split(","):
        examples = datasets[kind]
        out_dir = os.path.join(args.out, kind)
        log(f"training {kind} ({len(examples)} examples, e.g. {examples[0][1]!r}) -> {out_dir}")
        t0 = time.time()
        base, steps, history = train(base, tok, gen, kind, examples, out_dir, args, log)
        train_s = time.time() - t0
        got = [r["text"] for r in gen.many(HELDOUT, CHECK_TOKENS, out_dir)]
        ok, ok_base = check(kind, got), check(kind, base_heldout)
        log(f"  {kind}: adapter passes {sum(ok)}/{len(ok)}, base passes {sum(ok_base)}/{len(ok)}")
        report["adapters"][kind] = {
            "steps": steps, "train_seconds": round(train_s, 1), "history": history,
            "adapter_pass": sum(ok), "base_pass": sum(ok_base), "n": len(ok),
            "samples": [{"prompt": p, "adapter": a, "adapter_ok": o, "base": b}
                        for p, a, o, b in zip(HELDOUT, got, ok, base_heldout)],
        }
    report["total_seconds"] = round(time.time() - t_start, 1)
    report["log"] = logs
    with open(check_path, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"done in {report['total_seconds']}s")


if __name__ == "__main__":
    main()
