#!/usr/bin/env python3
"""The report of scripts/bench-compression.sh: agreement of compressed adapters with their full
rank, and S2 throughput per rank, from the files the script wrote to OUT_DIR. Prints markdown
tables and writes OUT_DIR/summary.json.

Usage: python3 scripts/bench_compression_report.py OUT_DIR TRAINED_RANK "R1 R2 ..." ADAPTER...
"""
import json, os, sys
out, trained, ranks, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]

def style_ok(adapter, text):
    """The demo adapters' own checks (tools/train_demo_adapters.py): None for other adapters."""
    if "upper" in adapter:
        letters = [c for c in text if c.isalpha()]
        return sum(c.isupper() for c in letters) >= 0.9 * max(1, len(letters))
    if "signoff" in adapter:
        return "-- Loraplex" in text
    return None


def style(adapter, outputs):
    ok = [style_ok(adapter, o["text"]) for o in outputs]
    return None if ok[0] is None else sum(ok)


def gens(path):
    return [json.loads(l) for l in open(path) if l.strip()]

rows = []
for n in names:
    full = gens(f"{out}/{n}-full.gen.jsonl")
    for r in ranks:
        info = json.load(open(f"{out}/{n}-r{r}.info.json"))
        comp = gens(f"{out}/{n}-r{r}.gen.jsonl")
        same = equal = total = 0
        gaps, prefixes = [], []
        for f, c in zip(full, comp):
            a, b = f["token_ids"], c["token_ids"]
            same += a == b
            total += len(a)
            equal += sum(x == y for x, y in zip(a, b))
            prefix = 0
            for i, (x, y) in enumerate(zip(a, b)):
                gaps.append(abs(f["logprobs"][i]["logprob"] - c["logprobs"][i]["logprob"]))
                if x != y:
                    break
                prefix += 1
            prefixes.append(prefix)
        rows.append({"adapter": n, "rank": int(r), "prompts": len(full),
                     "relative_error": info["compression"]["relative_error"],
                     "identical_outputs": same / len(full), "token_match": equal / total,
                     "mean_logprob_gap": sum(gaps) / len(gaps),
                     "mean_common_prefix": sum(prefixes) / len(prefixes), "bytes": info["bytes"],
                     "style_kept": style(n, comp), "style_full": style(n, full)})
s2 = []
for r in ["0"] + ranks:
    res = json.load(open(f"{out}/s2-r{r}/results.json"))
    s2.append({"rank": trained if r == "0" else int(r), "results": res})
summary_s2 = []
for x in s2:
    ph = {p["name"]: p for p in x["results"]["phases"]}
    summary_s2.append({"rank": x["rank"],
                       "adapters_tok_s": ph["adapters"]["output_tokens_per_s"],
                       "base_tok_s": ph["base"]["output_tokens_per_s"]})
json.dump({"agreement": rows, "s2": summary_s2}, open(f"{out}/summary.json", "w"), indent=1)
print(f"agreement with rank {trained} (greedy, 128 tokens, {rows[0]['prompts'] if rows else 0} chat prompts)")
print("| adapter | rank | relative error of dW | identical outputs | tokens equal | tokens before the first difference (mean) | mean abs logprob gap | style kept (full rank) |")
print("|---|---|---|---|---|---|---|---|")
for x in rows:
    kept = "-" if x["style_kept"] is None else f"{x['style_kept']}/{x['prompts']} ({x['style_full']})"
    print(f"| {x['adapter']} | {x['rank']} | {x['relative_error']:.3f} | {100*x['identical_outputs']:.0f}% "
          f"| {100*x['token_match']:.1f}% | {x['mean_common_prefix']:.1f} | {x['mean_logprob_gap']:.4f} | {kept} |")
print()
print("S2 (32 streams in flight, 32 distinct adapters)")
print("| rank | output tok/s, adapters | output tok/s, base | adapters / base |")
print("|---|---|---|---|")
for x in s2:
    ph = {p["name"]: p for p in x["results"]["phases"]}
    a, base = ph["adapters"]["output_tokens_per_s"], ph["base"]["output_tokens_per_s"]
    print(f"| {x['rank']} | {a:.1f} | {base:.1f} | {a / base:.3f} |")
