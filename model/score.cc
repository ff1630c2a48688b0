#include "model/score.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace loraplex::model {

absl::StatusOr<ScoreResult> ScoreTokens(LlamaModel& model, const std::vector<int32_t>& tokens,
                                        int64_t context, const LoraWeightsView* adapter) {
  const LlamaConfig& c = model.config();
  if (context < 4 || context > c.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("score: context ", context, " outside [4, ", c.max_position_embeddings, "]"));
  }
  const int64_t chunks = static_cast<int64_t>(tokens.size()) / context;
  if (chunks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("score: the text has ", tokens.size(),
                                                   " tokens, fewer than one context of ", context));
  }
  const bool add_bos = model.has_tokenizer() && model.tokenizer().spec().add_bos;
  const int64_t block = 16;
  LP_ASSIGN_OR_RETURN(KvCache cache, model.CreateKvCache((context + block - 1) / block, block));
  const int64_t vocab = c.vocab_size;
  const int64_t first = context / 2;

  ForwardBatch b;
  b.max_blocks_per_seq = cache.num_blocks();
  for (int64_t i = 0; i < cache.num_blocks(); ++i) b.block_tables.push_back(*cache.AllocateBlock());
  for (int64_t j = 0; j < context; ++j) {
    b.positions.push_back(static_cast<int32_t>(j));
    b.token_seq.push_back(0);
  }
  for (int64_t j = first; j < context - 1; ++j) b.logit_rows.push_back(static_cast<int32_t>(j));
  if (adapter != nullptr) {
    b.adapters = {adapter};
    b.token_adapter.assign(context, 0);
  }

  double nll = 0;
  int64_t count = 0;
  std::vector<float> logits;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t start = chunk * context;
    b.tokens.assign(tokens.begin() + start, tokens.begin() + start + context);
    if (add_bos) b.tokens[0] = c.bos_token_id;
    LP_RETURN_IF_ERROR(model.Forward(b, &cache, &logits));
    for (size_t r = 0; r < b.logit_rows.size(); ++r) {
      const float* row = logits.data() + r * vocab;
      const int32_t target = tokens[start + b.logit_rows[r] + 1];
      // -log softmax(row)[target], in double.
      const float mx = *std::max_element(row, row + vocab);
      double sum = 0;
      for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
      nll += std::log(sum) - (static_cast<double>(row[target]) - mx);
      ++count;
    }
  }
  ScoreResult out;
  out.chunks = chunks;
  out.scored_tokens = count;
  out.mean_nll = nll / count;
  out.perplexity = std::exp(out.mean_nll);
  return out;
}

}  // namespace loraplex::model
