// Corrupt, truncated and hostile GGUF and safetensors files: each must give INVALID_ARGUMENT with a
// message naming the file and the field at fault, and never crash or read out of bounds. This
// binary also runs under AddressSanitizer in CI (label "asan").

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "formats/dequantize.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "tests/testing/testing.h"

namespace loraplex::formats {
namespace {

using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::IsOk;
using ::loraplex::testing::MakeTempDir;
using ::loraplex::testing::StatusIs;
using ::testing::HasSubstr;

constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path << " (regenerate with: python3 tools/make_gguf_fixtures.py)";
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& bytes) {
  // Unlink first: truncating an existing file makes ext4 (auto_da_alloc) flush it to disk, which
  // turns thousands of rewrites into minutes.
  std::remove(path.c_str());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Writes `bytes` to a scratch file of this test binary and returns its path.
std::string Scratch(const std::string& bytes, const std::string& name = "scratch") {
  static const std::string dir = MakeTempDir("formats-malformed");
  std::string path = dir + "/" + name;
  WriteAll(path, bytes);
  return path;
}

// Opening succeeded: every tensor must also dequantize without touching memory outside the file.
void DequantizeAll(const std::vector<TensorInfo>& tensors) {
  for (const TensorInfo& t : tensors) {
    auto v = DequantizeToF32(t);
    EXPECT_THAT(v, IsOk()) << t.name;
  }
}

absl::Status OpenGguf(const std::string& bytes) {
  auto f = GgufFile::Open(Scratch(bytes, "x.gguf"));
  if (f.ok()) DequantizeAll((*f)->tensors());
  return f.status();
}

absl::Status OpenSafetensors(const std::string& bytes) {
  auto f = SafetensorsFile::Open(Scratch(bytes, "x.safetensors"));
  if (f.ok()) DequantizeAll((*f)->tensors());
  return f.status();
}

// ---- a byte-level GGUF writer for hand-made corrupt files
// ----------------------------------------

template <typename T>
std::string Le(T v) {
  std::string s(sizeof(T), '\0');
  std::memcpy(s.data(), &v, sizeof(T));
  return s;
}
std::string Str(const std::string& s) { return Le<uint64_t>(s.size()) + s; }
std::string Header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
  return "GGUF" + Le<uint32_t>(version) + Le<uint64_t>(n_tensors) + Le<uint64_t>(n_kv);
}
std::string KvU32(const std::string& key, uint32_t v) { return Str(key) + Le<uint32_t>(4) + Le(v); }
std::string Tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                   uint64_t offset) {
  std::string s = Str(name) + Le<uint32_t>(ne.size());
  for (uint64_t d : ne) s += Le(d);
  return s + Le(type) + Le(offset);
}
std::string PadTo(std::string s, size_t align) {
  s.resize((s.size() + align - 1) / align * align, '\0');
  return s;
}
// A file with the given tensor directory and `data_bytes` zero bytes of data after it.
std::string WithData(const std::string& head, size_t data_bytes) {
  return PadTo(head, 32) + std::string(data_bytes, '\0');
}

TEST(GgufMalformedTest, HandMadeValidFileOpens) {
  // Guards the builder itself: the corrupt variants below differ from this in one field each.
  std::string ok = WithData(Header(2, 1) + KvU32("general.alignment", 32) +
                                Tensor("a", {32, 2}, 8, 0) + Tensor("b", {4}, 0, 96),
                            128);
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(Scratch(ok, "ok.gguf")));
  EXPECT_EQ(f->Find("a")->shape, (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(f->Find("a")->nbytes, 68u);
  EXPECT_EQ(f->Find("b")->data - f->Find("a")->data, 96);
}

TEST(GgufMalformedTest, BadMagicAndVersion) {
  EXPECT_THAT(OpenGguf("GGUX" + Header(0, 0).substr(4)), StatusIs(kInvalid, "bad magic"));
  EXPECT_THAT(OpenGguf(""), StatusIs(kInvalid, "truncated"));
  EXPECT_THAT(OpenGguf(Header(0, 0, 1)), StatusIs(kInvalid, "version 1"));
  EXPECT_THAT(OpenGguf(Header(0, 0, 7)), StatusIs(kInvalid, "version 7"));
  EXPECT_THAT(OpenGguf(Header(0, 0, 0x03000000)), StatusIs(kInvalid, "big-endian"));
  EXPECT_THAT(OpenGguf(Header(0, 0, 2)), IsOk());  // v2 has the same layout
  // Errors name the file.
  EXPECT_THAT(OpenGguf("nope"), StatusIs(kInvalid, "x.gguf"));
}

TEST(GgufMalformedTest, CountsThatCannotFitAreRefusedBeforeAllocating) {
  EXPECT_THAT(OpenGguf(Header(0, uint64_t{1} << 60)), StatusIs(kInvalid, "metadata count"));
  EXPECT_THAT(OpenGguf(Header(1000, 0)), StatusIs(kInvalid, "tensor count 1000 cannot fit"));
  std::string huge_array = Str("k") + Le<uint32_t>(9) + Le<uint32_t>(4) + Le<uint64_t>(1ull << 61);
  EXPECT_THAT(OpenGguf(Header(0, 1) + huge_array), StatusIs(kInvalid, "array of"));
  std::string huge_string_array =
      Str("k") + Le<uint32_t>(9) + Le<uint32_t>(8) + Le<uint64_t>(1000) + Str("x");
  EXPECT_THAT(OpenGguf(Header(0, 1) + huge_string_array), StatusIs(kInvalid, "'k'"));
}

TEST(GgufMalformedTest, MoreArrayElementsThanAnyModelNeedsAreRefused) {
  // 17M one-byte elements fit in the file, but would cost ~40 bytes each once parsed.
  const uint64_t n = (uint64_t{1} << 24) + 1;
  std::string big = Str("k") + Le<uint32_t>(9) + Le<uint32_t>(0) + Le<uint64_t>(n);
  big.resize(big.size() + n, '\0');
  EXPECT_THAT(OpenGguf(Header(0, 1) + big), StatusIs(kInvalid, "elements in total"));
  EXPECT_THAT(OpenGguf(Header(uint64_t{1} << 21, 0)), StatusIs(kInvalid, "exceeds the limit"));
}

TEST(GgufMalformedTest, StringLengths) {
  EXPECT_THAT(OpenGguf(Header(0, 1) + Le<uint64_t>(~uint64_t{0}) + "key" + std::string(16, 'k')),
              StatusIs(kInvalid, "string length"));
  std::string long_value = Str("k") + Le<uint32_t>(8) + Le<uint64_t>(1ull << 40) + "abc";
  EXPECT_THAT(OpenGguf(Header(0, 1) + long_value), StatusIs(kInvalid, "metadata 'k'"));
  EXPECT_THAT(OpenGguf(Header(1, 0) + Le<uint64_t>(100) + std::string(30, 'n')),
              StatusIs(kInvalid, "tensor name"));
}

TEST(GgufMalformedTest, MetadataValues) {
  EXPECT_THAT(OpenGguf(Header(0, 1) + Str("k") + Le<uint32_t>(13) + Le<uint32_t>(0)),
              StatusIs(kInvalid, "unknown value type 13"));
  EXPECT_THAT(OpenGguf(Header(0, 1) + Str("k") + Le<uint32_t>(9) + Le<uint32_t>(77) +
                       Le<uint64_t>(1) + Le<uint32_t>(0)),
              StatusIs(kInvalid, "unknown array element type 77"));
  EXPECT_THAT(OpenGguf(Header(0, 1) + Str("flag") + Le<uint32_t>(7) + std::string(1, '\x02')),
              StatusIs(kInvalid, "bool"));
  EXPECT_THAT(OpenGguf(Header(0, 2) + KvU32("k", 1) + KvU32("k", 2)),
              StatusIs(kInvalid, "duplicate metadata 'k'"));
  // Arrays of arrays nested beyond any real use: refused, not recursed into until the stack ends.
  std::string deep = Str("deep") + Le<uint32_t>(9);
  for (int i = 0; i < 100000; ++i) deep += Le<uint32_t>(9) + Le<uint64_t>(1);
  deep += Le<uint32_t>(0) + Le<uint64_t>(0);
  EXPECT_THAT(OpenGguf(Header(0, 1) + deep), StatusIs(kInvalid, "nested deeper"));
  for (uint32_t bad : {0u, 3u, 48u}) {
    EXPECT_THAT(OpenGguf(Header(0, 1) + KvU32("general.alignment", bad)),
                StatusIs(kInvalid, "general.alignment"))
        << bad;
  }
  EXPECT_THAT(OpenGguf(Header(0, 1) + Str("general.alignment") + Le<uint32_t>(8) + Str("32")),
              StatusIs(kInvalid, "general.alignment"));
}

TEST(GgufMalformedTest, TensorDirectory) {
  auto one = [](const std::string& tensor, size_t data) {
    return OpenGguf(WithData(Header(1, 0) + tensor, data));
  };
  EXPECT_THAT(one(Tensor("t", {1, 1, 1, 1, 1}, 0, 0), 32), StatusIs(kInvalid, "5 dims"));
  EXPECT_THAT(one(Tensor("t", {4, 0}, 0, 0), 32), StatusIs(kInvalid, "tensor 't': dim 1 is 0"));
  EXPECT_THAT(one(Tensor("t", {1ull << 63, 4}, 0, 0), 32), StatusIs(kInvalid, "dim 0"));
  EXPECT_THAT(one(Tensor("t", {1ull << 32, 1ull << 32}, 0, 0), 32), StatusIs(kInvalid, "overflow"));
  EXPECT_THAT(one(Tensor("t", {1ull << 31, 1ull << 31, 4}, 0, 0), 32),
              StatusIs(kInvalid, "overflow"));
  EXPECT_THAT(one(Tensor("t", {32}, 6, 0), 32), StatusIs(kInvalid, "Q5_0 (id 6)"));
  EXPECT_THAT(one(Tensor("t", {32}, 1000, 0), 32), StatusIs(kInvalid, "ggml type id 1000"));
  EXPECT_THAT(one(Tensor("t", {33}, 2, 0), 64), StatusIs(kInvalid, "not a multiple of the Q4_0"));
  EXPECT_THAT(one(Tensor("t", {8}, 0, 0), 31), StatusIs(kInvalid, "outside the data section"));
  EXPECT_THAT(one(Tensor("t", {8}, 0, 64), 64), StatusIs(kInvalid, "outside the data section"));
  EXPECT_THAT(one(Tensor("t", {8}, 0, ~uint64_t{0} - 31), 64),
              StatusIs(kInvalid, "outside the data section"));
  EXPECT_THAT(one(Tensor("t", {8}, 0, 8), 64),
              StatusIs(kInvalid, "not a multiple of the alignment"));
  EXPECT_THAT(one(Tensor("t", {8}, 0, 0), 0), StatusIs(kInvalid, "tensor 't'"));
  EXPECT_THAT(one(Tensor("t", {8}, 0, 0), 32), IsOk());  // the control
}

TEST(GgufMalformedTest, OverlappingAndDuplicateTensors) {
  EXPECT_THAT(
      OpenGguf(WithData(Header(2, 0) + Tensor("a", {16}, 0, 0) + Tensor("b", {8}, 0, 32), 128)),
      StatusIs(kInvalid, "overlaps"));
  EXPECT_THAT(
      OpenGguf(WithData(Header(2, 0) + Tensor("a", {8}, 0, 32) + Tensor("b", {8}, 0, 32), 128)),
      StatusIs(kInvalid, "overlaps tensor 'a'"));
  EXPECT_THAT(
      OpenGguf(WithData(Header(2, 0) + Tensor("a", {8}, 0, 0) + Tensor("a", {8}, 0, 32), 128)),
      StatusIs(kInvalid, "duplicate tensor 'a'"));
  EXPECT_THAT(
      OpenGguf(WithData(Header(2, 0) + Tensor("a", {8}, 0, 0) + Tensor("b", {8}, 0, 32), 128)),
      IsOk());
}

// Every prefix of a real file fails cleanly, until only the padding to `alignment` after the last
// tensor is missing; longer prefixes open too.
void CheckEveryPrefix(const std::string& fixture, size_t alignment) {
  const std::string full = ReadAll(fixture);
  ASSERT_FALSE(full.empty());
  size_t first_ok = full.size();
  for (size_t len = 0; len < full.size(); ++len) {
    absl::Status s = OpenGguf(full.substr(0, len));
    if (s.ok()) {
      first_ok = std::min(first_ok, len);
    } else {
      ASSERT_EQ(s.code(), kInvalid) << "prefix " << len << ": " << s;
      ASSERT_EQ(first_ok, full.size()) << "prefix " << len << " fails after a shorter one opened";
      ASSERT_THAT(std::string(s.message()), HasSubstr("x.gguf"));
    }
  }
  EXPECT_GE(first_ok + alignment - 1, full.size()) << "a prefix missing more than padding opened";
}

TEST(GgufMalformedTest, EveryPrefixOfTheMetadataFixture) {
  CheckEveryPrefix(FixturesDir() + "/gguf/metadata.gguf", 64);
}

TEST(GgufMalformedTest, EveryPrefixOfTheTensorFixture) {
  CheckEveryPrefix(FixturesDir() + "/gguf/tensors.gguf", 32);
}

// Overwrites each byte of the header and directory with a few values: the reader either refuses
// the file or gives tensors that dequantize inside the mapping (ASan checks the latter).
TEST(GgufMalformedTest, ByteFlipsInTheDirectory) {
  const std::string full = ReadAll(FixturesDir() + "/gguf/tensors.gguf");
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(FixturesDir() + "/gguf/tensors.gguf"));
  const size_t dir_end = std::min<size_t>(full.size(), 700);  // header + metadata + directory
  int refused = 0;
  for (size_t pos = 0; pos < dir_end; ++pos) {
    for (uint8_t v : {uint8_t{0x00}, uint8_t{0xFF}, uint8_t{0x80}, uint8_t(full[pos] + 1)}) {
      if (static_cast<uint8_t>(full[pos]) == v) continue;
      std::string bad = full;
      bad[pos] = static_cast<char>(v);
      absl::Status s = OpenGguf(bad);
      if (!s.ok()) {
        ASSERT_EQ(s.code(), kInvalid) << "byte " << pos << " = " << int(v) << ": " << s;
        ++refused;
      }
    }
  }
  EXPECT_GT(refused, 0);
}

// ---- safetensors
// -----------------------------------------------------------------------------------

std::string St(const std::string& header, const std::string& data,
               uint64_t header_len = ~uint64_t{0}) {
  if (header_len == ~uint64_t{0}) header_len = header.size();
  return Le<uint64_t>(header_len) + header + data;
}

TEST(SafetensorsMalformedTest, HeaderLengthAndJson) {
  EXPECT_THAT(OpenSafetensors(""), StatusIs(kInvalid, "8-byte header length"));
  EXPECT_THAT(OpenSafetensors("1234567"), StatusIs(kInvalid, "x.safetensors"));
  EXPECT_THAT(OpenSafetensors(St("{}", "", 3)), StatusIs(kInvalid, "past the end"));
  EXPECT_THAT(OpenSafetensors(St("{}", "", ~uint64_t{0} - 1)), StatusIs(kInvalid, "100 MB"));
  EXPECT_THAT(OpenSafetensors(St("{\"a\":", "")), StatusIs(kInvalid, "not valid JSON"));
  EXPECT_THAT(OpenSafetensors(St("[1,2]", "")), StatusIs(kInvalid, "not an object"));
  EXPECT_THAT(OpenSafetensors(St("{}", "")), IsOk());
  EXPECT_THAT(OpenSafetensors(St("{\"__metadata__\":{\"k\":3}}", "")),
              StatusIs(kInvalid, "__metadata__ value of 'k'"));
  EXPECT_THAT(OpenSafetensors(St("{\"__metadata__\":[]}", "")), StatusIs(kInvalid, "__metadata__"));
}

TEST(SafetensorsMalformedTest, Entries) {
  const std::string data(64, '\0');
  auto one = [&](const std::string& entry) {
    return OpenSafetensors(St("{\"w\":" + entry + "}", data));
  };
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})"), IsOk());
  EXPECT_THAT(one("3"), StatusIs(kInvalid, "tensor 'w': entry is not a JSON object"));
  EXPECT_THAT(one(R"({"shape":[4],"data_offsets":[0,16]})"), StatusIs(kInvalid, "'dtype'"));
  EXPECT_THAT(one(R"({"dtype":"F7","shape":[4],"data_offsets":[0,16]})"),
              StatusIs(kInvalid, "tensor 'w': unknown dtype 'F7'"));
  EXPECT_THAT(one(R"({"dtype":"I64","shape":[2],"data_offsets":[0,16]})"),
              StatusIs(kInvalid, "dtype 'I64' is not supported"));
  EXPECT_THAT(one(R"({"dtype":"F32","data_offsets":[0,16]})"), StatusIs(kInvalid, "'shape'"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[-4],"data_offsets":[0,16]})"),
              StatusIs(kInvalid, "bad dim -4"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4.5],"data_offsets":[0,16]})"),
              StatusIs(kInvalid, "bad dim"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]})"),
              StatusIs(kInvalid, "overflow"));
  EXPECT_THAT(
      one(R"({"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]})"),
      StatusIs(kInvalid, "17 dims"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4]})"), StatusIs(kInvalid, "data_offsets"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0]})"),
              StatusIs(kInvalid, "data_offsets"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4],"data_offsets":[-16,0]})"),
              StatusIs(kInvalid, "data_offsets"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4],"data_offsets":[16,0]})"),
              StatusIs(kInvalid, "outside the data section"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4],"data_offsets":[56,72]})"),
              StatusIs(kInvalid, "outside the data section"));
  EXPECT_THAT(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615]})"),
              StatusIs(kInvalid, "outside the data section"));
  EXPECT_THAT(one(R"({"dtype":"F16","shape":[4],"data_offsets":[0,16]})"),
              StatusIs(kInvalid, "shape and dtype need 8"));
}

TEST(SafetensorsMalformedTest, DuplicateTensorNames) {
  const std::string data(64, '\0');
  EXPECT_THAT(OpenSafetensors(St(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                 R"("a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})",
                                 data)),
              StatusIs(kInvalid, "header names 'a' twice"));
  // Equal keys one level down (inside different entries) are fine.
  EXPECT_THAT(OpenSafetensors(St(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                 R"("b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})",
                                 data)),
              IsOk());
}

TEST(SafetensorsMalformedTest, OverlappingTensors) {
  const std::string data(64, '\0');
  EXPECT_THAT(OpenSafetensors(St(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                 R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                                 data)),
              StatusIs(kInvalid, "overlaps"));
  EXPECT_THAT(OpenSafetensors(St(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                 R"("b":{"dtype":"BF16","shape":[8],"data_offsets":[16,32]},)"
                                 R"("z":{"dtype":"F16","shape":[0],"data_offsets":[8,8]}})",
                                 data)),
              IsOk());  // adjacent ranges and an empty tensor inside another are fine
}

TEST(SafetensorsMalformedTest, EveryPrefixAndByteFlipOfTheSmallFixture) {
  const std::string full = ReadAll(FixturesDir() + "/gguf/small.safetensors");
  ASSERT_FALSE(full.empty());
  for (size_t len = 0; len < full.size(); ++len) {
    absl::Status s = OpenSafetensors(full.substr(0, len));
    ASSERT_THAT(s, StatusIs(kInvalid, "x.safetensors")) << "prefix " << len;
  }
  uint64_t header_len;
  std::memcpy(&header_len, full.data(), 8);
  for (size_t pos = 0; pos < 8 + header_len; ++pos) {
    for (char v : {'\0', '\xFF', '9', '"', '}'}) {
      if (full[pos] == v) continue;
      std::string bad = full;
      bad[pos] = v;
      absl::Status s = OpenSafetensors(bad);
      if (!s.ok()) {
        ASSERT_EQ(s.code(), kInvalid) << "byte " << pos << ": " << s;
      }
    }
  }
}

// ---- sharded index
// -----------------------------------------------------------------------------------

class ShardedMalformedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("formats-shards");
    WriteAll(dir_ + "/s1.safetensors",
             St(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(8, 0)));
    WriteAll(dir_ + "/s2.safetensors",
             St(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(8, 0)));
    WriteAll(dir_ + "/dup.safetensors",
             St(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("c":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                std::string(16, 0)));
  }
  absl::Status OpenIndex(const std::string& json) {
    WriteAll(dir_ + "/model.safetensors.index.json", json);
    return SafetensorsModel::Open(dir_).status();
  }
  std::string dir_;
};

TEST_F(ShardedMalformedTest, IndexProblemsNameTheIndexAndField) {
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})"), IsOk());
  EXPECT_THAT(OpenIndex("{"), StatusIs(kInvalid, "index.json: not valid JSON"));
  EXPECT_THAT(OpenIndex("[]"), StatusIs(kInvalid, "not an object"));
  EXPECT_THAT(OpenIndex(R"({"metadata":{}})"), StatusIs(kInvalid, "'weight_map'"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{}})"), StatusIs(kInvalid, "empty"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":1}})"), StatusIs(kInvalid, "weight_map['a']"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"../s1.safetensors"}})"),
              StatusIs(kInvalid, "not a file name beside the index"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"/etc/passwd"}})"),
              StatusIs(kInvalid, "not a file name beside the index"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"gone.safetensors"}})"),
              StatusIs(absl::StatusCode::kNotFound, "gone.safetensors"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"b":"s1.safetensors"}})"),
              StatusIs(kInvalid, "tensor 'b' is mapped to shard 's1.safetensors'"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"s1.safetensors","x":"dup.safetensors"}})"),
              StatusIs(kInvalid, "tensor 'x'"));
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"s1.safetensors","c":"dup.safetensors"}})"),
              StatusIs(kInvalid, "appears in two shards"));
  WriteAll(dir_ + "/s2.safetensors", "garbage!");
  EXPECT_THAT(OpenIndex(R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})"),
              StatusIs(kInvalid, "shard 's2.safetensors'"));
}

}  // namespace
}  // namespace loraplex::formats
