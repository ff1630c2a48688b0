// Fuzzes the GGUF reader (formats/gguf.h) and what the model reads from GGUF metadata: the typed
// look-ups, dequantization of every tensor, the tokenizer (model/tokenizer_gguf.cc) and the model
// config (LlamaConfig::FromGguf). Bad input must give a status, never a crash, and an accepted
// file must be self-consistent.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "formats/dequantize.h"
#include "formats/gguf.h"
#include "fuzz/fuzz_util.h"
#include "model/llama_config.h"
#include "model/tokenizer.h"

namespace {

using loraplex::formats::GgufFile;
using loraplex::formats::GgufValue;
using loraplex::formats::TensorInfo;

// Every accessor on every value: each returns a value or a status.
void TouchValue(const GgufValue& v, int depth) {
  (void)v.AsInt();
  (void)v.AsFloat();
  (void)v.AsString();
  if (const GgufValue::Array* a = v.AsArray(); a != nullptr && depth < 4) {
    for (const GgufValue& e : a->values) TouchValue(e, depth + 1);
  }
}

void CheckTokenizer(const loraplex::model::Tokenizer& tok) {
  const int32_t vocab = tok.vocab_size();
  for (std::string_view text :
       {std::string_view("Hello world, 123 <s> \xE2\x96\x81 \xFF!"), std::string_view("")}) {
    const std::vector<int32_t> ids = tok.Encode(text, /*add_bos=*/true);
    for (int32_t id : ids) LP_FUZZ_CHECK(id >= 0 && id < vocab);
    (void)tok.Decode(ids);
  }
  std::vector<int32_t> all;
  for (int32_t id = -1; id <= vocab && id < 4096; ++id) all.push_back(id);
  const std::string text = tok.Decode(all);
  LP_FUZZ_CHECK(loraplex::model::SanitizeUtf8(text) == text);
  (void)tok.ApplyChatTemplate({{"system", "s"}, {"user", "u"}, {"assistant", "a"}},
                              /*add_generation_prompt=*/true);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = loraplex::fuzz::ScratchDir("gguf") + "/model.gguf";
  loraplex::fuzz::WriteFileOrDie(path, std::string_view(reinterpret_cast<const char*>(data), size));

  auto opened = GgufFile::Open(path);
  if (!opened.ok()) {
    LP_FUZZ_CHECK(opened.status().code() == absl::StatusCode::kInvalidArgument);
    LP_FUZZ_CHECK(opened.status().message().find(path) != std::string_view::npos);
    return 0;
  }
  const GgufFile& f = **opened;
  for (const auto& [key, value] : f.metadata()) {
    LP_FUZZ_CHECK(f.FindMetadata(key) == &value);
    TouchValue(value, 0);
    (void)f.GetInt(key);
    (void)f.GetFloat(key);
    (void)f.GetString(key);
    (void)f.GetStringArray(key);
    (void)f.GetFloatArray(key);
    (void)f.GetIntArray(key);
  }
  uint64_t covered = 0;
  for (const TensorInfo& t : f.tensors()) {
    LP_FUZZ_CHECK(f.Find(t.name) == &t);
    covered += t.nbytes;
    LP_FUZZ_CHECK(covered <= size);  // tensors do not overlap and lie inside the file
    if (t.NumElements() <= (int64_t{1} << 22)) {
      auto values = loraplex::formats::DequantizeToF32(t);
      LP_FUZZ_CHECK_OK(values.status());
      LP_FUZZ_CHECK(static_cast<int64_t>(values->size()) == t.NumElements());
      if (!t.shape.empty() && t.shape.back() > 0) {
        std::vector<float> row(static_cast<size_t>(t.shape.back()));
        const int64_t rows = t.NumElements() / t.shape.back();
        if (rows > 0) {
          LP_FUZZ_CHECK_OK(loraplex::formats::DequantizeRowsToF32(t, rows - 1, 1, row.data()));
        }
        LP_FUZZ_CHECK(!loraplex::formats::DequantizeRowsToF32(t, rows, 1, row.data()).ok());
      }
    }
  }
  if (auto tok = loraplex::model::Tokenizer::FromGguf(f); tok.ok()) CheckTokenizer(**tok);
  if (auto config = loraplex::model::LlamaConfig::FromGguf(f); config.ok()) {
    LP_FUZZ_CHECK_OK(config->Validate());
    const std::vector<float> inv = config->RopeInvFreq();
    LP_FUZZ_CHECK(static_cast<int64_t>(inv.size()) == config->head_dim / 2);
  }
  return 0;
}
