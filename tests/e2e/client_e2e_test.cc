// End to end: every `loraplex` subcommand as a real process against a real loraplex-server on a
// free loopback port (stories260K). The greedy story in ../shared/models/stories260K is the
// reference for generate; bench results are checked for internal consistency (every request
// accounted for, ordered percentiles, throughput = tokens / duration).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex {
namespace {

// A loraplex-server child process on stories260K; ok() is false when it did not come up (e.g. a
// flag it refuses).
class ServerProcess : public testing::ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra)
      : testing::ServerProcess(LP_SERVER_BINARY, WithModel(std::move(extra))) {}

 private:
  static std::vector<std::string> WithModel(std::vector<std::string> args) {
    args.insert(args.begin(),
                {"--model=" + testing::Stories260KDir() + "/stories260K.gguf", "--dtype=f32"});
    return args;
  }
};

struct CliResult {
  int code = -1;
  std::string out, err;
};

std::string ShellQuote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `loraplex ARGS` through the shell with `env` assignments and `input` on stdin.
CliResult Cli(const std::vector<std::string>& args, const std::string& input = "",
              const std::string& env = "") {
  static const std::string dir = testing::MakeTempDir("lp-client-e2e-cli");
  std::ofstream(dir + "/in") << input;
  std::string cmd = env + " " + ShellQuote(LP_CLIENT_BINARY);
  for (const std::string& a : args) cmd += " " + ShellQuote(a);
  cmd += " <" + dir + "/in >" + dir + "/out 2>" + dir + "/err";
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = ReadAll(dir + "/out");
  r.err = ReadAll(dir + "/err");
  return r;
}

std::string Describe(const CliResult& r) {
  return absl::StrCat("exit ", r.code, "\nstdout: ", r.out, "\nstderr: ", r.err);
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);  // nothing listens there afterwards
  return ntohs(addr.sin_port);
}

std::string PeftRoot() { return testing::FixturesDir() + "/peft/stories260k"; }

class ClientE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess({"--adapter_dir=" + PeftRoot(), "--max_batch_tokens=256"});
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(server_->ok()) << "loraplex-server did not start:\n" << server_->log();
  }
  // `loraplex ARGS --server ADDRESS`.
  static CliResult Run(std::vector<std::string> args, const std::string& input = "") {
    args.push_back("--server=" + server_->address());
    return Cli(args, input);
  }
  static ServerProcess* server_;
};
ServerProcess* ClientE2eTest::server_ = nullptr;

TEST_F(ClientE2eTest, HealthAndInfo) {
  CliResult r = Run({"health"});
  EXPECT_EQ(r.code, 0) << Describe(r);
  EXPECT_EQ(r.out, "SERVING\n");
  r = Run({"health", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_EQ(nlohmann::json::parse(r.out)["status"], "SERVING");

  r = Run({"info"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("vocab"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("512 (bos 1, eos 2)"), std::string::npos) << r.out;
  r = Run({"info", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json info = nlohmann::json::parse(r.out);
  EXPECT_EQ(info["vocab_size"], 512);  // a JSON number, not the proto3 mapping's string
  EXPECT_EQ(info["num_layers"], 5);
  EXPECT_EQ(info["dtype"], "f32");
}

TEST_F(ClientE2eTest, GenerateReproducesTheGoldenStory) {
  std::ifstream gf(testing::Stories260KDir() + "/golden-greedy.json");
  const nlohmann::json golden = nlohmann::json::parse(gf);
  const auto want = golden["greedy_ids_after_bos"].get<std::vector<int32_t>>();
  CliResult r = Run({"generate", "--prompt-ids=1", "--max-tokens=60", "--ignore-eos", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), want);
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], 60);
  EXPECT_EQ(j["usage"]["prompt_tokens"], 1);
  EXPECT_GE(j["ttft_ms"].get<double>(), 0);

  // The streamed human output is the same text, with a final newline.
  CliResult h = Run({"generate", "--prompt-ids", "1", "--max-tokens", "60", "--ignore-eos"});
  ASSERT_EQ(h.code, 0) << Describe(h);
  const std::string text = j["text"];
  EXPECT_EQ(h.out, text + (text.empty() || text.back() != '\n' ? "\n" : ""));
  EXPECT_EQ(h.err, "");

  // Text prompt, from the arguments or stdin.
  CliResult a = Run({"generate", "--max-tokens=8", "Once", "upon", "a", "time"});
  CliResult b = Run({"generate", "--max-tokens=8", "-"}, "Once upon a time");
  ASSERT_EQ(a.code, 0) << Describe(a);
  EXPECT_FALSE(a.out.empty());
  EXPECT_EQ(a.out, b.out);
}

TEST_F(ClientE2eTest, GenerateLogprobsAndStats) {
  CliResult r = Run({"generate", "--prompt-ids=1", "--max-tokens=4", "--logprobs=3", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["logprobs"].size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    const auto& lp = j["logprobs"][i];
    EXPECT_EQ(lp["token_id"], j["token_ids"][i]);
    ASSERT_EQ(lp["top"].size(), 3u);
    // Greedy: the chosen token is the best alternative; tops are best first.
    EXPECT_EQ(lp["top"][0]["token_id"], lp["token_id"]);
    EXPECT_GE(lp["top"][0]["logprob"].get<double>(), lp["top"][1]["logprob"].get<double>());
    EXPECT_LE(lp["logprob"].get<double>(), 0.0);
  }
  CliResult t = Run({"generate", "--prompt-ids=1", "--max-tokens=4", "--logprobs=2", "--stats"});
  ASSERT_EQ(t.code, 0) << Describe(t);
  EXPECT_NE(t.out.find("LOGPROB"), std::string::npos) << t.out;
  EXPECT_NE(t.err.find("[finish length, 1 prompt + 4 generated tokens"), std::string::npos)
      << t.err;
}

TEST_F(ClientE2eTest, ErrorsSayWhatWentWrong) {
  // Unknown adapter: NOT_FOUND, exit 5, one line naming it.
  CliResult r = Run({"generate", "--adapter=no-such-adapter", "--max-tokens=4", "hello"});
  EXPECT_EQ(r.code, 5) << Describe(r);
  EXPECT_NE(r.err.find("loraplex: generate: not found"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("no-such-adapter"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;

  // A bad request field: INVALID_ARGUMENT, exit 6.
  r = Run({"generate", "--temperature=-1", "hello"});
  EXPECT_EQ(r.code, 6) << Describe(r);
  EXPECT_NE(r.err.find("INVALID_ARGUMENT"), std::string::npos) << r.err;

  // Usage errors never reach the server: exit 2.
  EXPECT_EQ(Cli({"frobnicate"}).code, 2);
  r = Run({"generate"});
  EXPECT_EQ(r.code, 2) << Describe(r);
  EXPECT_NE(r.err.find("exactly one of a prompt"), std::string::npos) << r.err;
  r = Run({"generate", "--max-tokens=many", "x"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--max-tokens wants an integer"), std::string::npos) << r.err;
  r = Run({"adapters", "get"});
  EXPECT_EQ(r.code, 2);
}

TEST(ClientE2eNoServerTest, StoppedServerIsReportedForEveryCommand) {
  const std::string addr = absl::StrCat("127.0.0.1:", FreePort());
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"health"},
                                             {"info"},
                                             {"generate", "hi"},
                                             {"adapters", "list"},
                                             {"bench", "--requests=1", "--concurrency=1"}}) {
    std::vector<std::string> full = args;
    full.push_back("--server=" + addr);
    const CliResult r = Cli(full);
    EXPECT_EQ(r.code, 3) << absl::StrJoin(args, " ") << ": " << Describe(r);
    EXPECT_NE(r.err.find("cannot reach the loraplex server at " + addr), std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // The address can come from the environment.
  const CliResult env = Cli({"health"}, "", "LORAPLEX_SERVER=" + addr);
  EXPECT_EQ(env.code, 3);
  EXPECT_NE(env.err.find(addr), std::string::npos) << env.err;
}

TEST(ClientE2eTokenTest, WrongTokenIsRefused) {
  ServerProcess server({"--api_token=s3cret", "--admin_token=s3cret"});
  ASSERT_TRUE(server.ok()) << "loraplex-server refused --api-token:\n" << server.log();
  const std::string at = "--server=" + server.address();
  CliResult r = Cli({"info", at, "--token=wrong"});
  EXPECT_EQ(r.code, 4) << Describe(r);
  EXPECT_NE(r.err.find("refused the token"), std::string::npos) << r.err;
  r = Cli({"info", at});
  EXPECT_EQ(r.code, 4) << Describe(r);
  EXPECT_NE(r.err.find("pass --token or set LORAPLEX_TOKEN"), std::string::npos) << r.err;
  EXPECT_EQ(Cli({"info", at, "--token=s3cret"}).code, 0);
  EXPECT_EQ(Cli({"info", at}, "", "LORAPLEX_TOKEN=s3cret").code, 0);
  // The admin calls too, inspection included: refused before anything is looked up.
  EXPECT_EQ(Cli({"adapters", "inspect", "qv", at, "--token=wrong"}).code, 4);
  EXPECT_EQ(Cli({"adapters", "inspect", "qv", at}).code, 4);
  EXPECT_EQ(Cli({"adapters", "inspect", "qv", at, "--token=s3cret"}).code, 5);  // not registered
}

TEST_F(ClientE2eTest, Chat) {
  // Not a terminal: no prompts are printed, replies only; /adapter with no name = base model.
  CliResult r =
      Run({"chat", "--max-tokens=8", "--temperature=0"}, "Hello\n/adapter\nTell me\n/exit\n");
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("(adapter: base model)"), std::string::npos) << r.out;
  EXPECT_EQ(r.err, "");
  r = Run({"chat", "--adapter=nope", "--max-tokens=4"}, "Hello\n");
  EXPECT_EQ(r.code, 5) << Describe(r);
}

TEST_F(ClientE2eTest, AdaptersLifecycle) {
  CliResult r = Run({"adapters", "list"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  r = Run({"adapters", "upload", "qv", PeftRoot() + "/qv", "--replace"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("uploaded qv version"), std::string::npos) << r.out;
  r = Run({"adapters", "get", "qv", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json info = nlohmann::json::parse(r.out);
  std::ifstream cf(PeftRoot() + "/qv/adapter_config.json");
  const nlohmann::json cfg = nlohmann::json::parse(cf);
  EXPECT_EQ(info["name"], "qv");
  EXPECT_EQ(info["rank"], cfg["r"]);
  r = Run({"adapters", "list"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("NAME"), std::string::npos);
  EXPECT_NE(r.out.find("qv"), std::string::npos);
  r = Run({"generate", "--adapter=qv", "--prompt-ids=1", "--max-tokens=4", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_EQ(nlohmann::json::parse(r.out)["adapter"], "qv");
  r = Run({"adapters", "load", "rs", "rslora", "--replace"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("loaded rs version"), std::string::npos) << r.out;
  EXPECT_EQ(Run({"adapters", "merge", "qv"}).code, 0);
  EXPECT_EQ(Run({"adapters", "unmerge", "qv"}).code, 0);
  EXPECT_EQ(Run({"adapters", "unload", "rs"}).code, 0);
  r = Run({"adapters", "unload", "qv"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  // Unload drains; the name is gone soon after.
  for (int i = 0; i < 50 && (r = Run({"adapters", "get", "qv"})).code == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(r.code, 5) << Describe(r);
  EXPECT_NE(r.err.find("adapters get qv: not found"), std::string::npos) << r.err;
  r = Run({"adapters", "upload", "x", "/nonexistent"});
  EXPECT_EQ(r.code, 2);
}

// `adapters load|upload --max-rank`: the server serves the adapter compressed, with numpy's
// relative errors (tests/fixtures/peft/stories260k/compressed/compression.json,
// tools/make_compression_goldens.py) in GetAdapter; its inspected spectrum is the top of the
// trained one (inspection.json); a negative rank is refused.
TEST_F(ClientE2eTest, AdaptersLoadAndUploadWithMaxRank) {
  std::ifstream cf(PeftRoot() + "/compressed/compression.json");
  const nlohmann::json golden = nlohmann::json::parse(cf)["adapters"];
  CliResult r = Run({"adapters", "load", "cmp64", "rank64", "--replace", "--max-rank=8"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("rank 8 compressed from 64, relative error 0.665"), std::string::npos)
      << r.out;
  r = Run({"adapters", "get", "cmp64", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  nlohmann::json info = nlohmann::json::parse(r.out);
  EXPECT_EQ(info["rank"], 8);
  EXPECT_EQ(info["ranks"]["q_proj"], 8);
  const nlohmann::json& want = golden["rank64_r8"];
  ASSERT_TRUE(info["compression"].is_object()) << r.out;
  EXPECT_EQ(info["compression"]["max_rank"], 8);
  EXPECT_EQ(info["compression"]["trained_rank"], 64);
  EXPECT_NEAR(info["compression"]["relative_error"].get<double>(),
              want["relative_error"].get<double>(), 1e-6);
  ASSERT_EQ(info["compression"]["modules"].size(), want["modules"].size());
  for (size_t i = 0; i < want["modules"].size(); ++i) {
    const nlohmann::json& g = info["compression"]["modules"][i];
    EXPECT_EQ(g["module"], want["modules"][i]["module"]);
    EXPECT_EQ(g["rank"], 8);
    EXPECT_NEAR(g["relative_error"].get<double>(),
                want["modules"][i]["relative_error"].get<double>(), 1e-6);
  }
  r = Run({"adapters", "get", "cmp64"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("max rank 8 (trained rank 64), 10 of 10 modules truncated"),
            std::string::npos)
      << r.out;
  r = Run({"generate", "--adapter=cmp64", "--prompt-ids=1", "--max-tokens=4", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);

  r = Run(
      {"adapters", "upload", "cmp-all", PeftRoot() + "/all_linear", "--replace", "--max-rank=2"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("rank 2 compressed from 4"), std::string::npos) << r.out;
  // Its spectrum is the trained one's top two (the served bf16 factors, hence 1e-2).
  std::ifstream gf(PeftRoot() + "/inspection.json");
  const nlohmann::json trained = nlohmann::json::parse(gf)["adapters"]["all_linear"]["modules"];
  r = Run({"adapters", "inspect", "cmp-all", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json inspected = nlohmann::json::parse(r.out)["modules"];
  ASSERT_EQ(inspected.size(), trained.size());
  for (size_t i = 0; i < trained.size(); ++i) {
    EXPECT_EQ(inspected[i]["rank"], 2);
    for (int k = 0; k < 2; ++k) {
      const double v = trained[i]["singular_values"][k];
      EXPECT_NEAR(inspected[i]["singular_values"][k].get<double>(), v, 1e-2 * v)
          << trained[i]["module"] << " " << k;
    }
  }

  r = Run({"adapters", "load", "cmp-bad", "rank64", "--max-rank=-1"});
  EXPECT_EQ(r.code, 6) << Describe(r);
  EXPECT_NE(r.err.find("max_rank must be 0"), std::string::npos) << r.err;
  EXPECT_EQ(Run({"adapters", "unload", "cmp64"}).code, 0);
  EXPECT_EQ(Run({"adapters", "unload", "cmp-all"}).code, 0);
}

// `loraplex generate --adapter a --adapter b --adapter-weights`: a weighted mix, served and
// named in the reply; weights that do not pair with the adapters are a usage error.
TEST_F(ClientE2eTest, GenerateAWeightedMix) {
  ASSERT_EQ(Run({"adapters", "load", "mix-qv", "qv", "--replace"}).code, 0);
  ASSERT_EQ(Run({"adapters", "load", "mix-all", "all_linear", "--replace"}).code, 0);
  CliResult r = Run({"generate", "--adapter=mix-qv", "--adapter=mix-all", "--adapter-weights",
                     "0.7,-0.4", "--prompt-ids=1", "--max-tokens=8", "--ignore-eos", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json mixed = nlohmann::json::parse(r.out);
  EXPECT_EQ(mixed["adapter"], "mix-qv@1*0.7+mix-all@1*-0.4");
  EXPECT_EQ(mixed["token_ids"].size(), 8u);
  // Weight 1 each by default; one adapter with a weight is a one-part mix.
  r = Run({"generate", "--adapter=mix-qv", "--adapter-weights=1", "--prompt-ids=1",
           "--max-tokens=8", "--ignore-eos", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json one = nlohmann::json::parse(r.out);
  EXPECT_EQ(one["adapter"], "mix-qv@1*1");
  r = Run({"generate", "--adapter=mix-qv", "--prompt-ids=1", "--max-tokens=8", "--ignore-eos",
           "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_EQ(nlohmann::json::parse(r.out)["token_ids"], one["token_ids"]);
  // The prefix cache keys a mix by its parts' versions and exact weights: the same mix again
  // finds the prompt's full block (16 of its 20 tokens), one a hair's weight apart does not.
  auto hits = [] {
    CliResult s = Run({"stats", "--json"});
    EXPECT_EQ(s.code, 0) << Describe(s);
    return nlohmann::json::parse(s.out)["prefix_cache_hit_tokens"].get<int64_t>();
  };
  const std::string prompt =
      "--prompt-ids=1,5,9,13,17,21,25,29,33,37,41,45,49,53,57,61,65,69,73,77";
  std::vector<nlohmann::json> outputs;
  std::vector<int64_t> found;
  for (const char* weights : {"0.7,-0.4", "0.7,-0.4", "0.7,-0.40001"}) {
    const int64_t before = hits();
    r = Run({"generate", "--adapter=mix-qv", "--adapter=mix-all", "--adapter-weights", weights,
             prompt, "--max-tokens=8", "--ignore-eos", "--json"});
    ASSERT_EQ(r.code, 0) << Describe(r);
    outputs.push_back(nlohmann::json::parse(r.out)["token_ids"]);
    found.push_back(hits() - before);
  }
  EXPECT_EQ(found, (std::vector<int64_t>{0, 16, 0}));
  EXPECT_EQ(outputs[0], outputs[1]);
  r = Run({"generate", "--adapter=mix-qv", "--adapter=mix-all", "--adapter-weights=0.5",
           "--prompt-ids=1", "--max-tokens=2"});
  EXPECT_EQ(r.code, 2) << Describe(r);
  EXPECT_NE(r.err.find("--adapter-weights: 1 weights for 2"), std::string::npos) << r.err;
  r = Run({"generate", "--adapter=mix-qv", "--adapter=mix-qv", "--prompt-ids=1", "--max-tokens=2"});
  EXPECT_EQ(r.code, 6) << Describe(r);
  EXPECT_EQ(Run({"adapters", "unload", "mix-qv"}).code, 0);
  EXPECT_EQ(Run({"adapters", "unload", "mix-all"}).code, 0);
}

// `adapters inspect` against numpy's dense SVD (tests/fixtures/peft/stories260k/inspection.json,
// tools/make_inspection_goldens.py): the JSON per module and the similarity of a pair, the table,
// the SVG spectra, the same base (pristine) while the adapter is merged, and an unknown name.
TEST_F(ClientE2eTest, AdaptersInspectMatchesNumpy) {
  std::ifstream gf(PeftRoot() + "/inspection.json");
  const nlohmann::json golden = nlohmann::json::parse(gf);
  CliResult r = Run({"adapters", "upload", "insp-all", PeftRoot() + "/all_linear", "--replace"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  r = Run({"adapters", "load", "insp-qv", "qv", "--replace"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const std::string svg_dir = testing::MakeTempDir("lp-inspect-svg");
  auto check = [&](const nlohmann::json& j) {
    EXPECT_EQ(j["adapter"], "insp-all");
    EXPECT_EQ(j["against"], "insp-qv");
    const nlohmann::json& want = golden["adapters"]["all_linear"]["modules"];
    const nlohmann::json& sim = golden["similarity"]["all_linear:qv"];
    ASSERT_EQ(j["modules"].size(), want.size());
    int similar = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const nlohmann::json& g = j["modules"][i];
      const nlohmann::json& e = want[i];
      const std::string module = e["module"];
      EXPECT_EQ(g["module"], module);
      EXPECT_EQ(g["rank"], e["rank"]);
      EXPECT_EQ(g["effective_rank"], e["effective_rank"]) << module;
      for (const char* k : {"fro_norm", "relative_norm", "amplification"}) {
        EXPECT_NEAR(g[k].get<double>(), e[k].get<double>(), 1e-4 * e[k].get<double>())
            << module << " " << k;
      }
      for (size_t k = 0; k < e["singular_values"].size(); ++k) {
        const double v = e["singular_values"][k];
        EXPECT_NEAR(g["singular_values"][k].get<double>(), v, 1e-4 * v) << module << " " << k;
      }
      EXPECT_EQ(g.contains("similarity"), sim.contains(module)) << module;
      if (sim.contains(module)) {
        EXPECT_NEAR(g["similarity"].get<double>(), sim[module].get<double>(), 1e-4) << module;
        ++similar;
      }
    }
    EXPECT_EQ(similar, 10);  // q_proj and v_proj of 5 layers
  };
  r = Run({"adapters", "inspect", "insp-all", "--against=insp-qv", "--json", "--out=" + svg_dir});
  ASSERT_EQ(r.code, 0) << Describe(r);
  check(nlohmann::json::parse(r.out));
  for (int l = 0; l < 5; ++l) {
    const std::string svg = ReadAll(absl::StrCat(svg_dir, "/layer-", l, ".svg"));
    EXPECT_NE(svg.find("<polyline"), std::string::npos) << "layer " << l;
    EXPECT_NE(svg.find("down_proj (r=4)"), std::string::npos) << "layer " << l;
  }
  // Merged, the base it is measured against is still the pristine one.
  ASSERT_EQ(Run({"adapters", "merge", "insp-all"}).code, 0);
  r = Run({"adapters", "inspect", "insp-all", "--against=insp-qv", "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  check(nlohmann::json::parse(r.out));
  ASSERT_EQ(Run({"adapters", "unmerge", "insp-all"}).code, 0);
  r = Run({"adapters", "inspect", "insp-qv"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("insp-qv v"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("AMPLIFICATION"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model.layers.4.self_attn.v_proj"), std::string::npos) << r.out;
  r = Run({"adapters", "inspect", "no-such-adapter"});
  EXPECT_EQ(r.code, 5) << Describe(r);
  r = Run({"adapters", "inspect", "insp-qv", "--against=no-such-adapter"});
  EXPECT_EQ(r.code, 5) << Describe(r);
  EXPECT_EQ(Run({"adapters", "unload", "insp-all"}).code, 0);
  EXPECT_EQ(Run({"adapters", "unload", "insp-qv"}).code, 0);
}

// Checks results.json of a bench run; `max_tokens` is the fixed output length.
void CheckBenchResults(const std::string& dir, double duration_bound, int max_tokens) {
  std::ifstream f(dir + "/results.json");
  ASSERT_TRUE(f) << dir;
  const nlohmann::json j = nlohmann::json::parse(f);
  const int64_t requests = j["requests"], completed = j["completed"], errors = j["errors"];
  EXPECT_GT(requests, 0);
  EXPECT_EQ(errors, 0) << j["error_examples"].dump();
  EXPECT_EQ(requests, completed + errors);
  EXPECT_EQ(j["sent"].get<int64_t>(), requests + j["warmup_requests"].get<int64_t>());
  for (const char* k : {"ttft", "tpot", "itl", "e2e"}) {
    const auto& s = j[k];
    for (const char* f : {"mean", "p50", "p90", "p99"}) ASSERT_TRUE(s.contains(f)) << k << f;
    EXPECT_GT(s["p50"].get<double>(), 0) << k;
    EXPECT_LE(s["p50"].get<double>(), s["p90"].get<double>()) << k;
    EXPECT_LE(s["p90"].get<double>(), s["p99"].get<double>()) << k;
  }
  EXPECT_EQ(j["ttft"]["count"].get<int64_t>(), completed);
  // ignore_eos: every request produced exactly max_tokens.
  EXPECT_EQ(j["output_tokens"].get<int64_t>(), completed * max_tokens);
  const double duration = j["duration_s"];
  EXPECT_GT(duration, 0);
  // Requests start within the bound; the last one then finishes within its own e2e latency.
  EXPECT_LE(duration, duration_bound + j["e2e"]["max"].get<double>() / 1e3 + 0.5);
  EXPECT_NEAR(j["output_tokens_per_s"].get<double>(), j["output_tokens"].get<double>() / duration,
              1e-6);
  EXPECT_NEAR(j["requests_per_s"].get<double>(), completed / duration, 1e-6);
  const std::string html = ReadAll(dir + "/report.html");
  size_t svgs = 0;
  for (size_t p = html.find("<svg"); p != std::string::npos; p = html.find("<svg", p + 1)) ++svgs;
  EXPECT_GE(svgs, 8u);  // four CDFs, two throughput charts, two per-adapter charts
  EXPECT_NE(html.find("TTFT CDF"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
}

TEST_F(ClientE2eTest, BenchClosedLoopBaseModel) {
  const std::string out = testing::MakeTempDir("lp-client-bench-closed");
  CliResult r = Run({"bench", "--concurrency=4", "--duration=3", "--warmup=0.5",
                     "--prompt-tokens=uniform:8:24", "--max-tokens=16", "--out=" + out, "--quiet"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("output tok/s"), std::string::npos) << r.out;
  CheckBenchResults(out, 3, 16);
  std::filesystem::remove_all(out);
}

TEST_F(ClientE2eTest, BenchOpenLoopGammaArrivals) {
  const std::string out = testing::MakeTempDir("lp-client-bench-open");
  CliResult r =
      Run({"bench", "--rate=20", "--arrival=gamma:2", "--duration=2", "--warmup=0",
           "--max-tokens=8", "--prompt-tokens=8", "--requests=30", "--out=" + out, "--json"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["config"]["mode"], "open loop");
  EXPECT_LE(j["requests"].get<int64_t>(), 30);
  CheckBenchResults(out, 2, 8);
  std::filesystem::remove_all(out);
}

// Shared system prompts (S9 scaled down) against the server's prefix cache (on by default): the
// same seeded requests twice, first into a cache holding none of their blocks, then into one
// holding all of them; every request generates the same tokens both times, and `stats` shows the
// hits.
TEST_F(ClientE2eTest, BenchSystemPromptsHitThePrefixCacheWithTheSameOutputs) {
  auto stats = [] {
    CliResult r = Run({"stats", "--json"});
    EXPECT_EQ(r.code, 0) << Describe(r);
    return nlohmann::json::parse(r.out, nullptr, false);
  };
  auto outputs = [](const std::string& dir) {
    std::vector<nlohmann::json> lines;
    std::ifstream in(dir + "/outputs.jsonl");
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
    return lines;
  };
  const nlohmann::json before = stats();
  std::vector<std::vector<nlohmann::json>> runs;
  for (int run = 0; run < 2; ++run) {
    const std::string out = testing::MakeTempDir("lp-client-bench-prefix");
    CliResult r = Run({"bench", "--concurrency=2", "--requests=12", "--warmup=0",
                       "--system-prompt-tokens=40", "--prompt-tokens=4", "--max-tokens=8",
                       "--seed=3", "--record-outputs", "--out=" + out, "--quiet"});
    ASSERT_EQ(r.code, 0) << Describe(r);
    runs.push_back(outputs(out));
    std::filesystem::remove_all(out);
  }
  ASSERT_EQ(runs[0].size(), 12u);
  ASSERT_EQ(runs[1].size(), 12u);
  for (size_t i = 0; i < 12; ++i) {
    EXPECT_EQ(runs[0][i]["index"], static_cast<int64_t>(i));
    EXPECT_EQ(runs[0][i]["code"], 0);
    EXPECT_EQ(runs[0][i]["ids"].size(), 8u);
    EXPECT_EQ(runs[0][i]["ids"], runs[1][i]["ids"]) << "request " << i;
  }
  const nlohmann::json after = stats();
  // 24 requests of 45 tokens; all but the first few find the 40-token prompt's full blocks (32
  // tokens of it with blocks of 16).
  EXPECT_GE(after["prefix_cache_hit_tokens"].get<int64_t>() -
                before["prefix_cache_hit_tokens"].get<int64_t>(),
            20 * 32);
  EXPECT_GT(after["prefix_cache_blocks"].get<int64_t>(), 0);
  CliResult r = Run({"stats"});
  EXPECT_NE(r.out.find("prefix cache hits"), std::string::npos) << r.out;
  r = Run({"info"});
  EXPECT_NE(r.out.find("prefix cache on"), std::string::npos) << r.out;
}

// S2 scaled down, its two phases in two rounds (base, adapters, base #2, adapters #2): each plan's
// throughput pooled over its rounds, the ratio of the pooled figures, and one ratio per round.
TEST_F(ClientE2eTest, BenchScenarioRoundsAlternateAndPool) {
  const std::string out = testing::MakeTempDir("lp-client-bench-rounds");
  CliResult r =
      Run({"bench", "--scenario=S2", "--concurrency=4", "--adapters=4",
           "--make-adapters=" + PeftRoot() + "/qv", "--requests=4", "--warmup=0",
           "--prompt-tokens=8", "--max-tokens=8", "--rounds=2", "--out=" + out, "--quiet"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  EXPECT_NE(r.out.find("phase adapters #2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("adapters / base output tok/s per round: "), std::string::npos) << r.out;
  std::ifstream f(out + "/results.json");
  const nlohmann::json j = nlohmann::json::parse(f);
  EXPECT_EQ(j["config"]["rounds"], 2);
  const nlohmann::json& phases = j["phases"];
  ASSERT_EQ(phases.size(), 4u);
  const char* names[] = {"base", "adapters", "base #2", "adapters #2"};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(phases[i]["name"], names[i]);
    EXPECT_EQ(phases[i]["errors"], 0) << names[i];
    EXPECT_EQ(phases[i]["output_tokens"], 4 * 8) << names[i];
    EXPECT_EQ(phases[i]["per_adapter"].contains("(base)"), i % 2 == 0) << names[i];
  }
  double tps[2];
  for (int k = 0; k < 2; ++k) {
    const nlohmann::json& p = j["pooled"][k == 0 ? "base" : "adapters"];
    EXPECT_EQ(p["rounds"], 2);
    EXPECT_EQ(p["output_tokens"], 2 * 4 * 8);
    const double seconds =
        phases[k]["duration_s"].get<double>() + phases[k + 2]["duration_s"].get<double>();
    EXPECT_NEAR(p["duration_s"].get<double>(), seconds, 1e-9);
    tps[k] = p["output_tokens_per_s"].get<double>();
    EXPECT_NEAR(tps[k], 64 / seconds, 1e-6);
  }
  EXPECT_NEAR(j["ratios"]["adapters / base output tok/s"].get<double>(), tps[1] / tps[0], 1e-9);
  const nlohmann::json& per_round = j["ratios"]["adapters / base output tok/s per round"];
  ASSERT_EQ(per_round.size(), 2u);
  for (int k = 0; k < 2; ++k) {
    EXPECT_NEAR(per_round[k].get<double>(),
                phases[2 * k + 1]["output_tokens_per_s"].get<double>() /
                    phases[2 * k]["output_tokens_per_s"].get<double>(),
                1e-9);
  }
  std::filesystem::remove_all(out);
}

TEST_F(ClientE2eTest, BenchEightAdaptersZipf) {
  const std::string out = testing::MakeTempDir("lp-client-bench-zipf");
  CliResult r =
      Run({"bench", "--concurrency=8", "--duration=4", "--warmup=0.5",
           "--make-adapters=" + PeftRoot() + "/qv", "--adapters=8", "--popularity=zipf:1.0",
           "--prompt-tokens=16", "--max-tokens=16", "--swap-every=1", "--out=" + out, "--quiet"});
  ASSERT_EQ(r.code, 0) << Describe(r);
  CheckBenchResults(out, 4, 16);
  std::ifstream f(out + "/results.json");
  const nlohmann::json j = nlohmann::json::parse(f);
  EXPECT_GE(j["per_adapter"].size(), 2u);
  EXPECT_EQ(j["swaps"]["failed"], 0);
  EXPECT_GE(j["swaps"]["done"].get<int64_t>(), 2);
  std::filesystem::remove_all(out);
}

}  // namespace
}  // namespace loraplex
