// Fuzzes the two tokenizer algorithms (model/tokenizer*.cc) with the stories260K SentencePiece
// vocabulary (from its GGUF) and SmolLM2's byte-level BPE (tests/fixtures/tokenizer/smollm2).
//
// Input: byte 0 picks the tokenizer (bit 0), encode or decode (bit 1) and add_bos (bit 2); the
// rest is text to encode, or little-endian uint16 values mapped to ids in [-8, vocab + 8) to
// decode. Invariants: encoded ids lie in the vocabulary; Decode is valid UTF-8; the StreamDecoder
// pieces concatenate to Decode (its documented contract); and text without special tokens
// round-trips through DecodeBytes(Encode()) (SPM: with the added leading space, "▁" read as a
// space; BPE: less the bytes whose byte-level character the vocabulary lacks).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "formats/gguf.h"
#include "fuzz/fuzz_util.h"
#include "model/tokenizer.h"

namespace {

using loraplex::model::StreamDecoder;
using loraplex::model::Tokenizer;
using loraplex::model::TokenizerSpec;

struct Tokenizers {
  std::unique_ptr<Tokenizer> spm;
  std::unique_ptr<Tokenizer> bpe;
  bool bpe_byte_present[256];  // whether byte b's byte-level character is a piece of `bpe`
};

// GPT-2's bytes_to_unicode, as UTF-8 (what the BPE vocabulary spells a raw byte as).
std::string ByteLevelChar(int b) {
  const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
  uint32_t cp = static_cast<uint32_t>(b);
  if (!direct) {
    cp = 256;
    for (int k = 0; k < b; ++k) {
      if (!((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE))) ++cp;
    }
  }
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

const Tokenizers& Get() {
  static const Tokenizers* t = [] {
    auto* out = new Tokenizers();
    auto gguf = loraplex::formats::GgufFile::Open(
        loraplex::fuzz::RequireFile(loraplex::fuzz::Stories260KDir() + "/stories260K.gguf"));
    LP_FUZZ_CHECK_OK(gguf.status());
    auto spm = Tokenizer::FromGguf(**gguf);
    LP_FUZZ_CHECK_OK(spm.status());
    out->spm = *std::move(spm);
    auto bpe = Tokenizer::FromHfDir(loraplex::fuzz::RequireFile(
        loraplex::fuzz::RepoRoot() + "/tests/fixtures/tokenizer/smollm2"));
    LP_FUZZ_CHECK_OK(bpe.status());
    out->bpe = *std::move(bpe);
    for (int b = 0; b < 256; ++b)
      out->bpe_byte_present[b] = out->bpe->PieceToId(ByteLevelChar(b)) >= 0;
    return out;
  }();
  return *t;
}

int32_t TypeOf(const Tokenizer& tok, int32_t id) {
  const auto& types = tok.spec().token_types;
  return types.empty() ? TokenizerSpec::kNormal : types[id];
}

void CheckDecode(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  const std::string text = tok.Decode(ids);
  LP_FUZZ_CHECK(loraplex::model::SanitizeUtf8(text) == text);
  StreamDecoder stream(&tok);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string piece = stream.Push(id);
    LP_FUZZ_CHECK(loraplex::model::SanitizeUtf8(piece) == piece);
    streamed += piece;
    (void)tok.Piece(id);
  }
  streamed += stream.Flush();
  LP_FUZZ_CHECK(streamed == text);
}

void CheckEncode(const Tokenizers& t, bool use_bpe, std::string_view text, bool add_bos) {
  const Tokenizer& tok = use_bpe ? *t.bpe : *t.spm;
  const std::vector<int32_t> ids = tok.Encode(text, add_bos);
  bool plain = true;  // only normal and byte tokens: no special token was written in the text
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    LP_FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
    const bool bos = add_bos && i == 0 && id == tok.bos_id();
    const int32_t type = TypeOf(tok, id);
    if (!bos && type != TokenizerSpec::kNormal && type != TokenizerSpec::kByte) plain = false;
  }
  if (add_bos && tok.spec().add_bos && tok.bos_id() >= 0) {
    LP_FUZZ_CHECK(!ids.empty() && ids[0] == tok.bos_id());
  }
  CheckDecode(tok, ids);
  if (!plain) return;
  std::string expected;
  if (use_bpe) {
    for (char c : text) {
      if (t.bpe_byte_present[static_cast<uint8_t>(c)]) expected.push_back(c);
    }
  } else {
    if (!text.empty() && tok.spec().add_space_prefix) expected = " ";
    for (size_t i = 0; i < text.size(); ++i) {
      if (text.substr(i, 3) == "\xE2\x96\x81") {  // "▁" decodes as the space it stands for
        expected.push_back(' ');
        i += 2;
      } else {
        expected.push_back(text[i]);
      }
    }
  }
  LP_FUZZ_CHECK(tok.DecodeBytes(ids) == expected);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Tokenizers& t = Get();
  if (size == 0) return 0;
  const bool use_bpe = data[0] & 1;
  const bool decode = data[0] & 2;
  const bool add_bos = data[0] & 4;
  const std::string_view payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (!decode) {
    CheckEncode(t, use_bpe, payload, add_bos);
    return 0;
  }
  const Tokenizer& tok = use_bpe ? *t.bpe : *t.spm;
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 1 < payload.size(); i += 2) {
    const uint32_t v = static_cast<uint8_t>(payload[i]) | static_cast<uint8_t>(payload[i + 1]) << 8;
    ids.push_back(static_cast<int32_t>(v % static_cast<uint32_t>(tok.vocab_size() + 16)) - 8);
  }
  CheckDecode(tok, ids);
  return 0;
}
