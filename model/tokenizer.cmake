# Tokenizers (SentencePiece-style and byte-level BPE) and chat templates. ICU supplies the
# Unicode categories of the BPE pre-tokenizer regexes (Debian libicu-dev).
find_package(ICU COMPONENTS uc i18n REQUIRED)
lp_library(lp_tokenizer
  SRCS tokenizer.cc tokenizer_spm.cc tokenizer_bpe.cc tokenizer_hf.cc tokenizer_gguf.cc
       chat_template.cc
  DEPS lp_formats lp_common nlohmann_json::nlohmann_json ICU::uc ICU::i18n absl::flat_hash_map absl::strings
       absl::status absl::statusor)
