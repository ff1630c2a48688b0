#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/corpus/<target>/ from the repository's fixtures.

Regenerate with:  python3 fuzz/make_seeds.py   (Python 3 standard library only)

Seeds are small (a few KB): whole fixture files where they are small, otherwise cut-down copies
(a GGUF's metadata without its tensors, two tensors of a PEFT safetensors file) and hand-made
inputs. Binary protobuf seeds are encoded by hand (no protobuf package needed). The script clears
and rewrites only fuzz/corpus/; inputs the fuzzer found later belong in fuzz/regressions/.
"""

import hashlib
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(ROOT, "tests", "fixtures")
STORIES = os.path.join(ROOT, "..", "shared", "models", "stories260K")
CORPUS = os.path.join(HERE, "corpus")


def read(path):
    with open(path, "rb") as f:
        return f.read()


class Corpus:
    def __init__(self, name):
        self.dir = os.path.join(CORPUS, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)

    def add(self, name, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        assert len(data) <= 16 * 1024, (self.dir, name, len(data))
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(data)


# --- safetensors --------------------------------------------------------------------------------

def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def cut_safetensors(path, keep):
    """The `keep` smallest tensors of a safetensors file (ties: file order), re-packed."""
    raw = read(path)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    base = 8 + n
    items = sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0],
                                                   kv[1]["data_offsets"][0]))[:keep]
    tensors = [(k, v["dtype"], v["shape"], raw[base + v["data_offsets"][0]:base + v["data_offsets"][1]])
               for k, v in items]
    return safetensors(tensors, meta)


def safetensors_seeds():
    c = Corpus("safetensors")
    c.add("small.safetensors", read(os.path.join(FIX, "gguf", "small.safetensors")))
    for f in sorted(os.listdir(os.path.join(FIX, "gguf", "sharded"))):
        if f.endswith(".safetensors"):
            c.add(f, read(os.path.join(FIX, "gguf", "sharded", f)))
    c.add("peft_qv_cut.safetensors", cut_safetensors(
        os.path.join(FIX, "peft", "stories260k", "qv", "adapter_model.safetensors"), 2))
    c.add("stories260k_cut.safetensors", cut_safetensors(os.path.join(STORIES, "model.safetensors"), 3))
    c.add("dtypes.safetensors", safetensors([
        ("f32", "F32", [2, 2], struct.pack("<4f", 1, -2, 0.5, 3e38)),
        ("f16", "F16", [3], struct.pack("<3e", 1, -0.0, 65504)),
        ("bf16", "BF16", [1, 2], b"\x80\x3f\x00\xff"),
        ("scalar", "F32", [], struct.pack("<f", 7)),
        ("empty", "F32", [0, 5], b""),
    ], {"format": "pt"}))
    c.add("unsupported_dtype.safetensors", safetensors([("i8", "I8", [4], b"\x01\x02\x03\x04")]))
    c.add("empty_header.safetensors", safetensors([]))


# --- GGUF ---------------------------------------------------------------------------------------

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                11: "<q", 12: "<d"}


def gguf_skip_value(raw, pos, vtype):
    if vtype in GGUF_SCALARS:
        return pos + struct.calcsize(GGUF_SCALARS[vtype])
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", raw, pos)
        return pos + 8 + n
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        for _ in range(count):
            pos = gguf_skip_value(raw, pos, etype)
        return pos
    raise ValueError("unknown GGUF value type %d" % vtype)


def gguf_metadata_only(path):
    """The header and metadata of a GGUF file with the tensor directory and data dropped."""
    raw = read(path)
    magic, version, _n_tensors, n_kv = struct.unpack_from("<IIQQ", raw, 0)
    pos = 24
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", raw, pos)
        pos = gguf_skip_value(raw, pos + 4, vtype)
    return struct.pack("<IIQQ", magic, version, 0, n_kv) + raw[24:pos]


def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, vtype, value):
    out = gguf_str(key) + struct.pack("<I", vtype)
    if vtype == 8:
        return out + gguf_str(value)
    if vtype == 9:
        etype, values = value
        out += struct.pack("<IQ", etype, len(values))
        for v in values:
            out += gguf_str(v) if etype == 8 else struct.pack(GGUF_SCALARS[etype], v)
        return out
    return out + struct.pack(GGUF_SCALARS[vtype], value)


def byte_level_chars():
    direct = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in direct:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def tiny_bpe_gguf():
    """A GGUF holding only a tiny gpt2 (byte-level BPE) tokenizer with a ChatML template."""
    chars = byte_level_chars()
    tokens = [chars[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    kvs = [
        gguf_kv("general.architecture", 8, "llama"),
        gguf_kv("tokenizer.ggml.model", 8, "gpt2"),
        gguf_kv("tokenizer.ggml.pre", 8, "smollm"),
        gguf_kv("tokenizer.ggml.tokens", 9, (8, tokens)),
        gguf_kv("tokenizer.ggml.token_type", 9, (5, types)),
        gguf_kv("tokenizer.ggml.merges", 9, (8, merges)),
        gguf_kv("tokenizer.ggml.bos_token_id", 4, len(tokens) - 3),
        gguf_kv("tokenizer.ggml.eos_token_id", 4, len(tokens) - 1),
        gguf_kv("tokenizer.chat_template", 8, "{% for m in messages %}<|im_start|>{{m['role']}}\n"
                "{{m['content']}}<|im_end|>\n{% endfor %}"),
        gguf_kv("llama.embedding_length", 4, 64),
        gguf_kv("llama.feed_forward_length", 4, 172),
        gguf_kv("llama.block_count", 4, 2),
        gguf_kv("llama.attention.head_count", 4, 8),
        gguf_kv("llama.attention.head_count_kv", 4, 4),
        gguf_kv("llama.context_length", 4, 512),
        gguf_kv("llama.rope.freq_base", 6, 10000.0),
        gguf_kv("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
    ]
    return struct.pack("<IIQQ", 0x46554747, 3, 0, len(kvs)) + b"".join(kvs)


def gguf_seeds():
    c = Corpus("gguf")
    c.add("metadata.gguf", read(os.path.join(FIX, "gguf", "metadata.gguf")))
    c.add("tensors.gguf", read(os.path.join(FIX, "gguf", "tensors.gguf")))
    c.add("stories260K_metadata.gguf", gguf_metadata_only(os.path.join(STORIES, "stories260K.gguf")))
    c.add("mistral_window_metadata.gguf",
          gguf_metadata_only(os.path.join(FIX, "tiny_llama", "mistral_window", "model.gguf")))
    c.add("tiny_bpe.gguf", tiny_bpe_gguf())


# --- adapter_config.json ------------------------------------------------------------------------

def peft_seeds():
    c = Corpus("peft_config")
    for model in ("stories260k", "smollm2"):
        base = os.path.join(FIX, "peft", model)
        for d in sorted(os.listdir(base)):
            p = os.path.join(base, d, "adapter_config.json")
            if os.path.exists(p):
                # The golden configs carry the absolute path of the machine that made them.
                j = json.loads(read(p))
                j["base_model_name_or_path"] = model
                c.add("%s_%s.json" % (model, d), json.dumps(j, indent=1))
    c.add("minimal.json", '{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}')
    c.add("regex.json", '{"r": 4, "target_modules": ".*\\\\.(q|v)_proj", '
          '"exclude_modules": ".*layers\\\\.0\\\\..*"}')
    c.add("layers.json", '{"r": 8, "target_modules": ["q_proj", "v_proj"], '
          '"layers_to_transform": [0, 2], "layers_pattern": "layers"}')
    c.add("layers_pattern_list.json", '{"r": 8, "target_modules": ["q_proj"], '
          '"layers_to_transform": 1, "layers_pattern": ["layers", "h"]}')
    c.add("patterns.json", '{"r": 8, "lora_alpha": 8.5, "use_rslora": true, "target_modules": '
          '"all-linear", "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2}, '
          '"alpha_pattern": {"v_proj": 3.0}, "exclude_modules": ["o_proj"]}')
    c.add("dora.json", '{"r": 8, "target_modules": ["q_proj"], "use_dora": true}')


# --- tokenizer ----------------------------------------------------------------------------------

def tokenizer_seeds():
    c = Corpus("tokenizer")
    spm = json.loads(read(os.path.join(FIX, "tokenizer", "stories260k_ids.json")))
    bpe = json.loads(read(os.path.join(FIX, "tokenizer", "smollm2_ids.json")))
    # Flags byte: bit 0 BPE (SmolLM2) else SPM (stories260K), bit 1 decode, bit 2 add_bos.
    for i, case in enumerate(spm["cases"][:24]):
        c.add("spm_encode_%02d" % i, bytes([4 * (i % 2)]) + case["text"].encode())
        if case["ids"]:
            c.add("spm_decode_%02d" % i, bytes([2]) + b"".join(struct.pack("<H", x + 8) for x in case["ids"]))
    for i, case in enumerate(bpe["cases"][:24]):
        c.add("bpe_encode_%02d" % i, bytes([1 + 4 * (i % 2)]) + case["text"].encode())
        if case["ids"]:
            c.add("bpe_decode_%02d" % i, bytes([3]) + b"".join(struct.pack("<H", x + 8) for x in case["ids"]))
    for i, t in enumerate(bpe["differs_from_converter_pre_tokenizer"][:4]):
        c.add("bpe_pre_%d" % i, b"\x01" + t.encode())
    c.add("spm_special", b"\x00<s>Once</s> upon<unk> a \xe2\x96\x81time\xff\xfe\xc3")
    c.add("bpe_special", b"\x01<|im_start|>user\nhi<|im_end|>\n<|endoftext|>\xff\xfe 12345")
    c.add("decode_out_of_range", b"\x02" + bytes(range(0, 64)))


# --- chat templates -----------------------------------------------------------------------------

def chat_seeds():
    c = Corpus("chat_template")
    fixtures = json.loads(read(os.path.join(FIX, "tokenizer", "chat_templates.json")))
    # flags: bit 0 add_generation_prompt, bit 1 BOS, bit 2 EOS, bits 3-4 tokenizer (0 small, 1
    # SmolLM2, 2 stories260K); records split by 0x1E, role and content by 0x1F.
    for t in fixtures["templates"]:
        for i, case in enumerate(t["cases"][:4]):
            flags = (1 if case["add_generation_prompt"] else 0) | 2 | 4
            rec = [t["template"].encode()] + [
                m["role"].encode() + b"\x1f" + m["content"].encode() for m in case["messages"]]
            c.add("%s_%d" % (t["name"], i), bytes([flags]) + b"\x1e".join(rec))
    c.add("smollm2_own", bytes([1 | 8]) + b"\x1euser\x1fHello<|im_end|>\x1eassistant\x1fHi")
    c.add("stories_default", bytes([1 | 16]) + b"\x1esystem\x1fBe brief.\x1euser\x1f<|im_start|>x")
    c.add("no_messages", bytes([1 | 2 | 4]) + b"[INST] <<SYS>>")


# --- manifest.json ------------------------------------------------------------------------------

def manifest_seeds():
    c = Corpus("manifest")
    sha = hashlib.sha256(read(os.path.join(FIX, "peft", "stories260k", "qv",
                                           "adapter_model.safetensors"))).hexdigest()

    def manifest(entries):
        return json.dumps({"format": "loraplex-adapter-manifest", "format_version": 1,
                           "adapters": entries}, indent=2) + "\n"

    qv = {"name": "qv", "version": 1, "sha256": sha, "pinned": False, "source": "path:qv",
          "merged": False}
    c.add("empty.json", manifest([]))
    c.add("qv.json", manifest([qv]))
    c.add("qv_pinned_merged.json", manifest([dict(qv, pinned=True, merged=True)]))
    c.add("qv_old_format.json", manifest([{"name": "qv", "version": 1, "sha256": sha}]))
    c.add("two.json", manifest([qv, dict(qv, name="other", version=3, source="upload")]))
    c.add("bad_sha.json", manifest([dict(qv, sha256="0" * 64)]))


# --- protobuf requests --------------------------------------------------------------------------

def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_len(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_varint(field, n):
    return varint(field << 3) + varint(n)


def pb_float(field, x):
    return varint(field << 3 | 5) + struct.pack("<f", x)


def pb_packed(field, values):
    return pb_len(field, b"".join(varint(v) for v in values))


def generate_seeds():
    c = Corpus("generate_request")
    msg = lambda role, content: pb_len(13, pb_len(1, role) + pb_len(2, content))
    c.add("prompt", pb_len(2, "Once upon a time"))
    c.add("prompt_empty", pb_len(2, ""))
    c.add("ids", pb_packed(3, [1, 403, 407, 511]) + pb_varint(4, 8))
    c.add("ids_bad", pb_packed(3, [1, 512, -1]))
    c.add("adapter", pb_len(1, "qv") + pb_len(2, "Lily") + pb_float(5, 0.7) + pb_varint(6, 40)
          + pb_float(7, 0.9) + pb_varint(8, 42) + pb_varint(11, 5))
    c.add("adapter_version", pb_len(1, "qv@1") + pb_len(2, "x") + pb_varint(4, 1))
    c.add("adapter_unknown", pb_len(1, "nope@2") + pb_len(2, "x"))
    c.add("messages", msg("system", "Be brief.") + msg("user", "Hi<|im_end|>")
          + msg("assistant", "Hello") + msg("user", "Tell a story"))
    c.add("stops", pb_len(2, "Once upon a time there was a girl") + pb_len(9, "a g")
          + pb_len(9, "") + pb_len(9, "there") + pb_packed(12, [2, 13]) + pb_varint(10, 1))
    c.add("too_long", pb_len(2, "a " * 300) + pb_varint(4, 400))
    c.add("bad_sampling", pb_len(2, "x") + pb_float(5, -1.0) + pb_float(7, 0.0)
          + pb_varint(6, -3) + pb_varint(11, 21) + pb_varint(4, 0))


def load_adapter_seeds():
    c = Corpus("load_adapter_request")
    req = lambda name, path, replace=0, pin=0: (pb_len(1, name) + pb_len(2, path)
                                                + pb_varint(3, replace) + pb_varint(4, pin))
    c.add("qv", req("qv", "qv"))
    c.add("nested", req("deep", "nested/deep/qv", 1, 1))
    c.add("dotdot_inside", req("a.b_c-d", "nested/../qv/", 1))
    c.add("symlink_out", req("evil", "out"))
    c.add("dotdot_out", req("evil", "../outside/evil"))
    c.add("half_out", req("half", "half_out"))
    c.add("absolute", req("abs", "/etc"))
    c.add("bad_name", req("../x", "qv"))
    c.add("empty", b"")


def main():
    safetensors_seeds()
    gguf_seeds()
    peft_seeds()
    tokenizer_seeds()
    chat_seeds()
    manifest_seeds()
    generate_seeds()
    load_adapter_seeds()
    for name in sorted(os.listdir(CORPUS)):
        files = os.listdir(os.path.join(CORPUS, name))
        size = sum(os.path.getsize(os.path.join(CORPUS, name, f)) for f in files)
        print("%-22s %3d seeds, %6d bytes" % (name, len(files), size))


if __name__ == "__main__":
    main()
