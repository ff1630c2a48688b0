#!/usr/bin/env python3
"""Makes the tokenizer golden fixtures in tests/fixtures/tokenizer/ from references no one here
wrote: HF transformers' GGUF->fast-tokenizer conversion, the `tokenizers` package, and the
`sentencepiece` library (fed the GGUF's vocabulary) for the SentencePiece-style model.

Usage (from the repository root; needs transformers, tokenizers, gguf; run once
scripts/fetch-model.sh or see below for the SmolLM2 GGUF):
    python3 tools/make_tokenizer_fixtures.py [--smollm2-gguf models/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes:
  smollm2/tokenizer.json, smollm2/tokenizer_config.json  the SmolLM2-135M-Instruct tokenizer as HF
      converts it from the GGUF, with the pre-tokenizer the upstream model has (see below)
  smollm2_ids.json     reference ids of every test string for SmolLM2
  stories260k_ids.json reference ids of every test string for stories260K (SentencePiece-style,
      by the sentencepiece library; transformers' conversion is a cross-check)
  chat_templates.json  apply_chat_template outputs for ChatML (SmolLM2), Llama 3, Llama 2, Mistral
  utf8_decode.json     byte strings and Python's decode("utf-8", "replace") of them

Two deliberate choices, recorded in the fixtures:
* SmolLM2's GGUF says tokenizer.ggml.pre = "smollm" (llama.cpp: isolate every \\p{N}, then the
  GPT-2 regex), and the upstream HF tokenizer.json has Sequence[Digits(individual_digits),
  ByteLevel]. transformers' GGUF converter drops the Digits step, so the saved tokenizer.json gets
  the upstream pre-tokenizer back. Strings on which the two differ are listed in the fixture.
* llama.cpp prefixes "\u2581" to every raw-text fragment after a special token in SentencePiece
  mode, so the stories260K reference encodes each fragment between special tokens separately.
  HF's Metaspace(prepend_scheme=first) also skips the prefix when the text already starts with a
  space, unlike SentencePiece and llama.cpp; hence sentencepiece is the reference there, and the
  script asserts that HF disagrees nowhere else.
"""
import argparse
import importlib.metadata
import json
import os
import random
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
STORIES = os.path.join(ROOT, "..", "shared", "models", "stories260K", "stories260K.gguf")


def versions():
    import gguf
    import sentencepiece
    import tokenizers
    import transformers
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "sentencepiece": sentencepiece.__version__,
            "gguf": importlib.metadata.version("gguf"), "protobuf": importlib.metadata.version("protobuf"),
            "python": sys.version.split()[0]}


def test_strings(specials):
    """>= 300 strings covering scripts, digits, white space, code, contractions and specials."""
    s = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\n  \n",
        "Hello", "Hello world", " Hello world", "Hello world ", "  leading two", "trailing two  ",
        "Hello, world! How are you?", "The quick brown fox jumps over the lazy dog.",
        "Once upon a time, there was a little girl named Lily.",
        "She loved to play outside in the park.", "One day, she saw a big, red ball.",
        "I'm", "you're", "they've", "we'll", "she'd", "it's", "don't", "I'M", "YOU'RE", "'s",
        "can't won't shouldn't", "'tis the season", "rock 'n' roll", "O'Neil's", "''''",
        "0", "1", "12", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "-42",
        "+1 (555) 123-4567", "2024-01-01T12:00:00Z", "v1.2.3", "0x1F", "1e-10", "99 bottles",
        "a1b2c3", "abc123def", " 123", "  456", "\t789", "1 2 3 4 5",
        "31415926535897932384626433832795028841971693993751058209749445923078164062862089986280",
        "²³", "½ cup", "Ⅻ o'clock", "٣٤٥", "१२३", "〇一二三", "①②③",
        "日本語のテキスト", "你好，世界", "中文分词测试：今天天气很好。", "한국어 텍스트", "カタカナ ひらがな",
        "مرحبا بالعالم", "السلام عليكم ورحمة الله", "नमस्ते दुनिया", "हिन्दी में लिखा गया पाठ",
        "Привет, мир!", "Съешь же ещё этих мягких французских булок", "Γειά σου κόσμε",
        "Ελληνικά γράμματα: αβγδε", "שלום עולם", "ไทย ภาษา", "Tiếng Việt có dấu", "Ünïcödé àéîõü",
        "straße", "ﬁ ligature", "Å Å", "e\u0301", "\u00a0nbsp\u00a0", "\u3000ideographic space",
        "\u2028line sep", "zero\u200bwidth", "\u200d", "\x0bvertical tab", "\x85next line",
        "\x0c form feed", "\x00nul", "\x01\x02\x03", "\x7f del",
        "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏻‍💻 coding", "🇺🇸🇯🇵", "❤️", "I ❤️ NY", "emoji😀inside",
        "🤖 robots 🤖", "𝕳𝖊𝖑𝖑𝖔", "𐍈 gothic", "🧑‍🤝‍🧑",
        "def foo(x):\n    return x + 1\n", "int main() { return 0; }",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "SELECT * FROM users WHERE id = 1;",
        "<html><body>Hi</body></html>", "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
        "x = y ** 2 // 3", "#include <stdio.h>", "if x != y && z >= 0:", "path/to/file.txt",
        "https://example.com/a?b=c&d=e#f", "user@example.com", "$HOME/.bashrc", "C:\\Windows\\",
        "    indented", "\tindented with tab", "line1\nline2\nline3", "para1\n\npara2",
        "a  b   c    d", "end.\n", "   \n\n   ", "!!!", "???", "...", "---", "***", "~~~",
        "(parenthesis)", "[brackets]", "{braces}", "«quotes»", "“curly”", "‘single’", "—dash—",
        "a.b.c", "a,b,c", "a;b;c", "tab\there", "mixed \t \n whitespace",
        "ALL CAPS SENTENCE", "camelCaseWord", "snake_case_word", "kebab-case-word", "PascalCase",
        "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "ababababababababab", "zzz", "qqq xxx",
        "a", "b", "I", "A", ".", ",", "\"", "'", "-", "_", "@", "#", "€", "£", "¥", "©", "™",
    ]
    # Special tokens inside text, at the edges, back to back, and near misses.
    for sp in specials:
        s += [sp, sp + sp, "a" + sp + "b", " " + sp + " ", "Hello" + sp, sp + "Hello", sp + " Hello",
              "x " + sp + " y", sp + "\n", "\n" + sp + "\n", sp[:-1], sp[1:], "<" + sp + ">"]
    s += ["".join(specials), " ".join(specials) + " end"]
    # Deterministic random mixtures of the above alphabets.
    rng = random.Random(1234)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      \n\t.,!?'\"-"
                "日本語中文한국어مرحباनमस्तेПриветΓειά😀👍🏽🇺🇸é½²")
    pieces = [" the", " a", "ing", "'s", "'re", " 42", "\n\n", "  ", "😀", "‍"] + list(specials)
    while len(s) < 330:
        n = rng.randint(1, 40)
        out = []
        for _ in range(n):
            out.append(rng.choice(pieces) if rng.random() < 0.15 else rng.choice(alphabet))
        s.append("".join(out))
    s.append("Long text. " * 60)
    # Unique, order kept.
    seen, uniq = set(), []
    for x in s:
        if x not in seen:
            seen.add(x)
            uniq.append(x)
    return uniq


def split_specials(text, specials):
    """Leftmost-longest split of text into ("raw", str) / ("special", str) fragments."""
    out, start, i = [], 0, 0
    by_len = sorted(specials, key=len, reverse=True)
    while i < len(text):
        m = next((sp for sp in by_len if text.startswith(sp, i)), None)
        if m is None:
            i += 1
            continue
        if i > start:
            out.append(("raw", text[start:i]))
        out.append(("special", m))
        i += len(m)
        start = i
    if start < len(text):
        out.append(("raw", text[start:]))
    return out


def smollm2(gguf_path, vers):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    d, name = os.path.split(os.path.abspath(gguf_path))
    hf = AutoTokenizer.from_pretrained(d, gguf_file=name)
    converted = json.loads(hf.backend_tokenizer.to_str())
    upstream = json.loads(json.dumps(converted))
    upstream["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True},
        ],
    }
    out_dir = os.path.join(OUT, "smollm2")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(upstream, f, ensure_ascii=False, separators=(",", ":"))
    config = {
        "bos_token": hf.bos_token, "eos_token": hf.eos_token, "unk_token": hf.unk_token,
        "pad_token": hf.pad_token, "add_bos_token": False, "chat_template": hf.chat_template,
        "_generated_by": "tools/make_tokenizer_fixtures.py from " + name, "_versions": vers,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)

    tok_up = Tokenizer.from_str(json.dumps(upstream))
    tok_conv = Tokenizer.from_str(json.dumps(converted))
    # The same vocabulary behind Llama 3's pre-tokenizer (and its ignore_merges), so that the
    # C++ "llama3" flavour is checked against HF's regex engine too.
    llama3 = json.loads(json.dumps(converted))
    llama3["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PRE_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False},
        ],
    }
    llama3["model"]["ignore_merges"] = True
    tok_llama3 = Tokenizer.from_str(json.dumps(llama3))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>", "<repo_name>"]
    cases, differ = [], []
    for text in test_strings(specials):
        ids = tok_up.encode(text, add_special_tokens=False).ids
        ids_gpt2 = tok_conv.encode(text, add_special_tokens=False).ids
        if ids != ids_gpt2:
            differ.append(text)
        cases.append({"text": text, "ids": ids, "ids_gpt2": ids_gpt2,
                      "ids_llama3": tok_llama3.encode(text, add_special_tokens=False).ids})
    fixture = {
        "source": name + " via transformers AutoTokenizer(gguf_file=...), pre-tokenizer = "
                  "Digits(individual_digits)+ByteLevel as upstream and llama.cpp 'smollm'",
        "versions": vers,
        "regenerate": "python3 tools/make_tokenizer_fixtures.py",
        "differs_from_converter_pre_tokenizer": differ,
        "ids_gpt2": "the converter's plain ByteLevel pre-tokenizer (GPT-2 regex)",
        "ids_llama3": "Llama 3's Split regex + ByteLevel(use_regex=false), ignore_merges=true",
        "cases": cases,
    }
    with open(os.path.join(OUT, "smollm2_ids.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=0)
    print(f"smollm2: {len(cases)} strings, {len(differ)} differ without the Digits step")
    return hf


def sentencepiece_from_gguf(reader):
    """A SentencePiece processor over the GGUF's own vocabulary: the reference implementation of
    the algorithm llama.cpp ports (merge the pair whose piece scores highest, byte fallback)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    sp_type = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
               3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
               5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id = 0, 1, 2
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for t, sc, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, sc, sp_type[int(ty)]
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def stories(vers):
    import gguf
    from transformers import AutoTokenizer
    tmp = tempfile.mkdtemp(prefix="lp_tok_")
    # transformers cannot load stories260K.gguf as is: its pad/separator ids are 0xFFFFFFFF
    # ("none"), which it indexes into the vocabulary. Copy the tokenizer keys without them.
    r = gguf.GGUFReader(STORIES)
    w = gguf.GGUFWriter(os.path.join(tmp, "stories_tok.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or not k.startswith("tokenizer"):
            continue
        if k in ("tokenizer.ggml.seperator_token_id", "tokenizer.ggml.padding_token_id"):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        else:
            w.add_key_value(k, f.contents(), vt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf = AutoTokenizer.from_pretrained(tmp, gguf_file="stories_tok.gguf")
    shutil.rmtree(tmp)

    specials = ["<unk>", "<s>", "</s>"]
    special_ids = {sp: hf.convert_tokens_to_ids(sp) for sp in specials}
    sp_proc = sentencepiece_from_gguf(r)

    def encode(text, fragment_encoder):
        ids = []
        for kind, frag in split_specials(text, specials):
            if kind == "special":
                ids.append(special_ids[frag])
            else:
                ids += fragment_encoder(frag)
        return ids

    def hf_encode(frag):
        return hf.encode(frag, add_special_tokens=False)

    golden = json.load(open(os.path.join(os.path.dirname(STORIES), "golden-greedy.json")))
    golden_text = golden["text"]
    golden_ids = golden["greedy_ids_after_bos"]
    # The golden text starts with the space the tokenizer prefixes; encode without it.
    sp_golden = encode(golden_text[1:], sp_proc.encode)
    hf_golden = encode(golden_text[1:], hf_encode)
    cases, hf_differs = [], []
    for t in test_strings(specials):
        ids = encode(t, sp_proc.encode)
        if ids != encode(t, hf_encode):
            hf_differs.append(t)
        cases.append({"text": t, "ids": ids})
    # HF's Metaspace(prepend_scheme=first) skips the "▁" prefix when a fragment already
    # starts with a space; SentencePiece and llama.cpp always add it. Any other disagreement
    # would mean one of the references is broken.
    unexplained = [t for t in hf_differs
                   if not any(k == "raw" and f[:1].isspace() for k, f in split_specials(t, specials))]
    assert not unexplained, unexplained
    fixture = {
        "source": "stories260K.gguf vocabulary (pieces, scores, types) as a SentencePiece BPE "
                  "ModelProto (add_dummy_prefix, byte_fallback, identity normalizer) encoded by "
                  "the sentencepiece library; each fragment between special tokens encoded "
                  "separately, as llama.cpp does. Cross-checked with transformers' GGUF "
                  "conversion, which differs only where a fragment starts with white space",
        "versions": vers,
        "regenerate": "python3 tools/make_tokenizer_fixtures.py",
        "golden_text_ids_sentencepiece": sp_golden,
        "golden_text_ids_hf": hf_golden,
        "golden_text_ids_equal_greedy_ids": sp_golden == golden_ids and hf_golden == golden_ids,
        "hf_whole_fragment_differs": hf_differs,
        "cases": cases,
    }
    with open(os.path.join(OUT, "stories260k_ids.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=0)
    print(f"stories260k: {len(cases)} strings, {len(hf_differs)} differ in HF (leading space); "
          f"golden text ids == greedy ids: {fixture['golden_text_ids_equal_greedy_ids']}")


LLAMA3_PRE_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                    "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
          "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content "
          "%}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
          "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
          "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
          "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation"
          " roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
          "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
          "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
          "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
          "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def chat_templates(smol_hf, vers):
    from transformers.utils.chat_template_utils import render_jinja_template
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],
        [{"role": "system", "content": " Be kind. "}, {"role": "user", "content": "  padded \n"},
         {"role": "assistant", "content": "\nSure. "}, {"role": "user", "content": "日本語 😀"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [],
    ]
    templates = [
        ("smollm2", smol_hf.chat_template, smol_hf.bos_token, smol_hf.eos_token),
        ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        ("llama2", LLAMA2, "<s>", "</s>"),
        ("mistral", MISTRAL, "<s>", "</s>"),
    ]
    out = []
    for name, tpl, bos, eos in templates:
        cases = []
        for conv in conversations:
            for gen in (False, True):
                case = {"messages": conv, "add_generation_prompt": gen}
                try:
                    rendered, _ = render_jinja_template(
                        conversations=[conv], chat_template=tpl, add_generation_prompt=gen,
                        bos_token=bos, eos_token=eos)
                    case["text"] = rendered[0]
                except Exception as e:  # the template raises: the C++ side must refuse too
                    case["error"] = str(e)
                cases.append(case)
        out.append({"name": name, "template": tpl, "bos_token": bos, "eos_token": eos,
                    "cases": cases})
    fixture = {"source": "transformers render_jinja_template (what apply_chat_template uses)",
               "versions": vers, "regenerate": "python3 tools/make_tokenizer_fixtures.py",
               "templates": out}
    with open(os.path.join(OUT, "chat_templates.json"), "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)


def utf8_decode(vers):
    samples = [b"", b"abc", b"\xe2\x82\xac", b"\xe2\x82", b"\xe2", b"\x80", b"\xff", b"\xc0\xaf",
               b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf0\x9f\x98",
               b"a\xf0\x9f\x98b", b"\xf0\x9f\x98\x80", b"\xc3\x28", b"\xe2\x28\xa1",
               b"\xf0\x28\x8c\xbc", b"\xf8\x88\x80\x80\x80", b"\xfe\xfe\xff\xff", b"\xc2",
               b"x\xc2", b"\xc2\xc2\xa9", b"\xe1\x80\xe1\x80\x80"]
    rng = random.Random(7)
    for _ in range(40):
        samples.append(bytes(rng.choice([0x41, 0x80, 0xbf, 0xc2, 0xe2, 0xf0, 0x9f, 0x98, 0xed,
                                         0xf4, 0x90, 0xff]) for _ in range(rng.randint(1, 8))))
    cases = [{"hex": b.hex(), "text": b.decode("utf-8", "replace")} for b in samples]
    with open(os.path.join(OUT, "utf8_decode.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "Python bytes.decode('utf-8', 'replace')", "versions": vers,
                   "regenerate": "python3 tools/make_tokenizer_fixtures.py", "cases": cases},
                  f, ensure_ascii=False, indent=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf",
                    default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    vers = versions()
    smol = smollm2(args.smollm2_gguf, vers)
    stories(vers)
    chat_templates(smol, vers)
    utf8_decode(vers)


if __name__ == "__main__":
    main()
