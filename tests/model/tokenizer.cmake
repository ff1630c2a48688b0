# Tokenizer tests: ids against references (tests/fixtures/tokenizer, made by
# tools/make_tokenizer_fixtures.py), round trips, streaming, chat templates, bad input.
lp_test(tokenizer_test SRCS tokenizer_test.cc DEPS lp_tokenizer nlohmann_json::nlohmann_json
        LABELS model)
