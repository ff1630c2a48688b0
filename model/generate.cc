#include "model/generate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace loraplex::model {
namespace {

constexpr int64_t kBlockSize = 16;

// Length of the longest suffix of `text` that is a proper prefix of some stop string: those bytes
// must be held back because the next token may complete the stop string.
size_t HeldBackForStop(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    for (size_t len = std::min(s.size() - 1, text.size()); len > hold; --len) {
      if (text.compare(text.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  return hold;
}

}  // namespace

absl::StatusOr<GenerateResult> Generate(LlamaModel& model, const std::vector<int32_t>& prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(const std::string&)>& on_text) {
  const LlamaConfig& c = model.config();
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", options.max_tokens));
  }
  LP_RETURN_IF_ERROR(options.sampling.Validate());
  for (int32_t id : prompt) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  if (total > c.max_position_embeddings) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prompt (", prompt.size(), " tokens) + max_tokens (", options.max_tokens,
                     ") exceeds the context length ", c.max_position_embeddings));
  }
  const int64_t blocks = (total + kBlockSize - 1) / kBlockSize;
  LP_ASSIGN_OR_RETURN(KvCache cache, model.CreateKvCache(blocks, kBlockSize));

  ForwardBatch batch;
  batch.max_blocks_per_seq = blocks;
  for (int64_t b = 0; b < blocks; ++b) {
    LP_ASSIGN_OR_RETURN(int32_t id, cache.AllocateBlock());
    batch.block_tables.push_back(id);
  }
  if (options.adapter != nullptr) batch.adapters.push_back(options.adapter);

  // Sampling needs only this many of each row's best logits (0: the whole row); on CUDA only
  // those come back from the device.
  int64_t top_k = Sampler::TopLogitsNeeded(options.sampling);
  if (top_k > LlamaModel::kMaxTopLogits) top_k = 0;
  auto run = [&](const int32_t* ids, int64_t count, int64_t start_pos,
                 StepLogits* logits) -> absl::Status {
    batch.tokens.assign(ids, ids + count);
    batch.positions.resize(count);
    for (int64_t i = 0; i < count; ++i) batch.positions[i] = static_cast<int32_t>(start_pos + i);
    batch.token_seq.assign(count, 0);
    batch.token_adapter.assign(options.adapter ? count : 0, 0);
    batch.logit_rows = {static_cast<int32_t>(count - 1)};
    return model.Forward(batch, &cache, top_k, logits);
  };

  GenerateResult result;
  result.prompt_tokens = static_cast<int32_t>(prompt.size());
  StepLogits logits;
  const int64_t chunk = std::max<int32_t>(1, options.prefill_chunk);
  for (int64_t start = 0; start < static_cast<int64_t>(prompt.size()); start += chunk) {
    int64_t count = std::min<int64_t>(chunk, prompt.size() - start);
    LP_RETURN_IF_ERROR(run(prompt.data() + start, count, start, &logits));
  }

  Sampler sampler(options.sampling);
  // Without a tokenizer (token ids in, ids out) the text stays empty and EOS is the config's id.
  const Tokenizer* tok = model.has_tokenizer() ? &model.tokenizer() : nullptr;
  StreamDecoder decoder(tok);
  std::string text;    // all final text so far
  size_t emitted = 0;  // bytes of `text` given to on_text
  int64_t pos = static_cast<int64_t>(prompt.size());
  result.finish_reason = "length";
  for (int32_t step = 0; step < options.max_tokens; ++step) {
    SampleResult sample = sampler.Sample(logits, 0);
    result.tokens.push_back({sample.token_id, sample.logprob, std::move(sample.top)});
    const int32_t id = sample.token_id;
    const bool eos =
        !options.ignore_eos && (tok ? tok->IsEndOfGeneration(id) : id == c.eos_token_id);
    const bool stop_id = std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(),
                                   id) != options.stop_token_ids.end();
    if (eos || stop_id) {
      result.finish_reason = eos ? "eos" : "stop";
      break;
    }
    if (tok) text += decoder.Push(id);
    bool stopped = false;
    for (const std::string& s : options.stop) {
      size_t at =
          s.empty() ? std::string::npos : text.find(s, emitted > s.size() ? emitted - s.size() : 0);
      if (at != std::string::npos) {
        text.resize(at);
        stopped = true;
      }
    }
    if (stopped) {
      result.finish_reason = "stop";
      break;
    }
    size_t final_len = text.size() - HeldBackForStop(text, options.stop);
    if (on_text && final_len > emitted) on_text(text.substr(emitted, final_len - emitted));
    emitted = std::max(emitted, final_len);
    if (step + 1 == options.max_tokens) break;
    LP_RETURN_IF_ERROR(run(&id, 1, pos, &logits));
    ++pos;
  }
  if (tok && result.finish_reason != "stop") text += decoder.Flush();
  if (on_text && text.size() > emitted) on_text(text.substr(emitted));
  result.text = std::move(text);
  return result;
}

}  // namespace loraplex::model
