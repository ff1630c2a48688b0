#include "adapters/lora_adapter.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "adapters/low_rank.h"
#include "common/half.h"
#include "common/status.h"
#include "formats/safetensors.h"
#include "model/lora_plan.h"
#include "re2/re2.h"

namespace loraplex::adapters {

using model::kNumLinearModules;
using model::LinearModule;

namespace {

constexpr const char* kModuleNames[kNumLinearModules] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

const char* Parent(LinearModule m) { return static_cast<int>(m) < 4 ? "self_attn" : "mlp"; }

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Converts one tensor (F32, F16 or BF16) to the storage dtype, multiplying by `scale` in f32
// first (so s*B is rounded once, as DESIGN.md section 3 asks). False when a value is not finite
// after scaling (the output is then garbage and discarded). The arithmetic is that of widening
// everything to f32, scaling, checking and narrowing with F32ToBf16, done in chunks through
// aligned buffers so that the compiler vectorises the loops: this is most of the CPU time of
// LoadAdapter -> READY.
bool ConvertScaled(const formats::TensorInfo& t, float scale, kernels::DType dtype, uint8_t* out) {
  const int64_t n = t.NumElements();
  const bool to_f32 = dtype == kernels::DType::kF32;
  constexpr int64_t kChunk = 2048;
  alignas(64) float x[kChunk];
  alignas(64) uint16_t h[kChunk];
  uint32_t special = 0;  // nonzero once a value is inf or NaN
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t m = std::min(kChunk, n - begin);
    switch (t.type) {
      case formats::StoredType::kF32:
        std::memcpy(x, t.data + 4 * begin, 4 * m);
        break;
      case formats::StoredType::kBF16:
        std::memcpy(h, t.data + 2 * begin, 2 * m);
        for (int64_t i = 0; i < m; ++i) x[i] = Bf16ToF32(h[i]);
        break;
      default:  // kF16; other types were refused before
        std::memcpy(h, t.data + 2 * begin, 2 * m);
        for (int64_t i = 0; i < m; ++i) x[i] = F16ToF32(h[i]);
        break;
    }
    for (int64_t i = 0; i < m; ++i) {
      x[i] *= scale;
      uint32_t bits;
      std::memcpy(&bits, &x[i], 4);
      special |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (to_f32) {
      std::memcpy(out + 4 * begin, x, 4 * m);
    } else {
      // F32ToBf16 without its NaN branch: a NaN fails the whole tensor above.
      for (int64_t i = 0; i < m; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &x[i], 4);
        h[i] = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
      }
      std::memcpy(out + 2 * begin, h, 2 * m);
    }
  }
  return special == 0;
}

// Why a tensor name is not a LoRA A/B of a decoder linear, in words a user can act on.
std::string WhyUnsupported(const std::string& name) {
  if (name.find("lora_embedding") != std::string::npos ||
      name.find("embed_tokens") != std::string::npos || name.find("lm_head") != std::string::npos) {
    return "embedding and lm_head LoRA are not supported";
  }
  if (name.find("modules_to_save") != std::string::npos) return "modules_to_save is not supported";
  if (name.find(".bias") != std::string::npos) return "LoRA bias is not supported";
  return "not a lora_A/lora_B weight of a q/k/v/o/gate/up/down projection";
}

// An f32 buffer as a tensor ConvertScaled can read.
formats::TensorInfo F32View(const std::vector<float>& data, int64_t rows, int64_t cols) {
  formats::TensorInfo t;
  t.type = formats::StoredType::kF32;
  t.shape = {rows, cols};
  t.data = reinterpret_cast<const uint8_t*>(data.data());
  t.nbytes = data.size() * sizeof(float);
  return t;
}

// ||B A||_F^2 = trace((B^T B)(A A^T)), in f64 from r x r Gram matrices.
double FrobeniusSquaredOfProduct(const float* a, const float* b, int64_t r, int64_t in,
                                 int64_t out) {
  std::vector<double> ga(r * r, 0.0), gb(r * r, 0.0);
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0;
      for (int64_t c = 0; c < in; ++c) s += double{a[i * in + c]} * a[j * in + c];
      ga[i * r + j] = s;
      double t = 0;
      for (int64_t o = 0; o < out; ++o) t += double{b[o * r + i]} * b[o * r + j];
      gb[i * r + j] = t;
    }
  }
  double sum = 0;
  for (int64_t i = 0; i < r * r; ++i) sum += ga[i] * gb[i];  // both symmetric
  return sum;
}

struct Found {
  const formats::TensorInfo* a = nullptr;
  const formats::TensorInfo* b = nullptr;
  const formats::TensorInfo* magnitude = nullptr;  // DoRA
};

// DoRA's g = m / ||W + B A||_row for one module: w [out, in] the base weight, a [r, in], b
// [out, r] (scaled), m [out]; each row summed in f64. False when a row's norm is 0 or g is not
// finite.
bool DoraScale(const std::vector<float>& w, const std::vector<float>& a,
               const std::vector<float>& b, const std::vector<float>& m, int64_t r, int64_t in,
               int64_t out, std::vector<float>* g) {
  g->resize(out);
  std::vector<float> row(in);
  for (int64_t o = 0; o < out; ++o) {
    std::copy(w.begin() + o * in, w.begin() + (o + 1) * in, row.begin());
    for (int64_t k = 0; k < r; ++k) {
      const float bk = b[o * r + k];
      const float* ak = a.data() + k * in;
      for (int64_t i = 0; i < in; ++i) row[i] += bk * ak[i];
    }
    double sq = 0;
    for (int64_t i = 0; i < in; ++i) sq += double{row[i]} * row[i];
    const float scale = static_cast<float>(m[o] / std::sqrt(sq));
    // g and 1 / g (mixed mode) must both be finite f32 numbers.
    if (!(sq > 0) || !std::isfinite(scale) || scale == 0 || !std::isfinite(1.0f / scale)) {
      return false;
    }
    (*g)[o] = scale;
  }
  return true;
}

}  // namespace

std::string ModuleKey(int64_t layer, LinearModule m) {
  return absl::StrCat("model.layers.", layer, ".", Parent(m), ".",
                      kModuleNames[static_cast<int>(m)]);
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Load(const std::string& dir,
                                                               const model::LlamaConfig& base,
                                                               const AdapterLoadOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": not an adapter directory"));
  }
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string st_path = (fs::path(dir) / "adapter_model.safetensors").string();
  if (!fs::exists(config_path, ec)) {
    return absl::NotFoundError(absl::StrCat(config_path, ": missing"));
  }
  if (!fs::exists(st_path, ec)) {
    for (const char* pickle : {"adapter_model.bin", "adapter_model.pt", "adapter_model.pth"}) {
      if (fs::exists(fs::path(dir) / pickle, ec)) {
        return absl::InvalidArgumentError(absl::StrCat(
            (fs::path(dir) / pickle).string(),
            ": pickle weights are refused (they can run code); save with safetensors"));
      }
    }
    return absl::NotFoundError(absl::StrCat(st_path, ": missing"));
  }

  auto adapter = std::unique_ptr<LoraAdapter>(new LoraAdapter());
  LP_ASSIGN_OR_RETURN(std::string text, ReadText(config_path));
  LP_ASSIGN_OR_RETURN(adapter->config_, ParsePeftConfig(text, config_path));
  const PeftConfig& cfg = adapter->config_;

  std::unique_ptr<formats::SafetensorsFile> file;
  {
    auto opened = formats::SafetensorsFile::Open(st_path);
    if (!opened.ok()) {
      // A malformed adapter file is the caller's bad input, whatever the reader called it.
      const absl::Status& s = opened.status();
      if (s.code() == absl::StatusCode::kNotFound) return s;
      return absl::InvalidArgumentError(std::string(s.message()));
    }
    file = std::move(opened).value();
  }

  // Map every tensor to (layer, module, A|B).
  static const RE2 kKey(
      R"(^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$)");
  static const RE2 kMagnitude(
      R"(^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_magnitude_vector(?:\.weight)?$)");
  std::map<std::pair<int64_t, int>, Found> found;
  for (const formats::TensorInfo& t : file->tensors()) {
    std::string digits, parent, module, which;
    if (RE2::FullMatch(t.name, kMagnitude, &digits, &parent, &module)) {
      if (!cfg.use_dora) {
        return absl::InvalidArgumentError(
            absl::StrCat(st_path, ": tensor '", t.name,
                         "': a DoRA magnitude, but adapter_config.json does not set use_dora"));
      }
      which = "magnitude";
    } else if (!RE2::FullMatch(t.name, kKey, &digits, &parent, &module, &which)) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", t.name, "': ", WhyUnsupported(t.name)));
    }
    int m = -1;
    for (int i = 0; i < kNumLinearModules; ++i) {
      if (module == kModuleNames[i] && parent == Parent(static_cast<LinearModule>(i))) m = i;
    }
    if (m < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", t.name, "': ", WhyUnsupported(t.name)));
    }
    const int64_t layer = digits.size() > 6 ? -1 : std::stoll(digits);
    if (layer < 0 || layer >= base.num_layers) {
      return absl::FailedPreconditionError(
          absl::StrCat(st_path, ": tensor '", t.name, "': layer ", digits,
                       " does not exist (the base model has ", base.num_layers, " layers)"));
    }
    if (t.type != formats::StoredType::kF32 && t.type != formats::StoredType::kF16 &&
        t.type != formats::StoredType::kBF16) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", t.name, "': dtype must be F32, F16 or BF16"));
    }
    const size_t dims = which == "magnitude" ? 1 : 2;
    if (t.shape.size() != dims) {
      return absl::InvalidArgumentError(absl::StrCat(st_path, ": tensor '", t.name, "': must be ",
                                                     dims, "-D, has ", t.shape.size(),
                                                     " dimensions"));
    }
    Found& f = found[{layer, m}];
    (which == "A" ? f.a : which == "B" ? f.b : f.magnitude) = &t;
  }

  // Every module the config targets must have its pair, and every pair must be targeted.
  for (int64_t l = 0; l < base.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const std::string key = ModuleKey(l, static_cast<LinearModule>(m));
      const bool targeted = cfg.Targets(key);
      const bool present = found.count({l, m}) > 0;
      if (targeted && !present) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, ": config and tensors disagree: target_modules selects ", key,
                         " but adapter_model.safetensors has no lora_A/lora_B for it"));
      }
      if (present && !targeted) {
        return absl::InvalidArgumentError(absl::StrCat(
            dir, ": config and tensors disagree: adapter_model.safetensors has weights for ", key,
            " which target_modules/layers_to_transform/exclude_modules do not select"));
      }
    }
  }
  if (found.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir,
        ": the adapter matches no module of the base model (target_modules); refusing to "
        "serve it as the base model"));
  }

  // Shapes and ranks first; then, with compress_rank, the truncated pairs in f32.
  struct Module {
    int64_t layer = 0;
    LinearModule m = LinearModule::kQ;
    const formats::TensorInfo* a = nullptr;
    const formats::TensorInfo* b = nullptr;
    int64_t in = 0, out = 0, rank = 0;  // rank as served
    float scale = 1;
    std::vector<float> a_f32, b_f32;     // the truncated pair (B scaled) when compressed
    formats::TensorInfo a_view, b_view;  // what is converted to storage
    const formats::TensorInfo* magnitude = nullptr;  // DoRA
    std::vector<float> dora_scale;                   // DoRA: g [out]
  };
  std::vector<Module> modules;
  modules.reserve(found.size());
  for (auto& [where, f] : found) {
    const auto [layer, mi] = where;
    const LinearModule m = static_cast<LinearModule>(mi);
    const std::string key = ModuleKey(layer, m);
    const std::string prefix = absl::StrCat(st_path, ": ", key, ": ");
    if (f.a == nullptr || f.b == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, f.a ? "lora_B" : "lora_A", ".weight is missing"));
    }
    const int64_t in = model::LinearInFeatures(base, m), out = model::LinearOutFeatures(base, m);
    const int64_t r = f.a->shape[0];
    if (f.b->shape[1] != r) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "lora_A has rank ", r, " but lora_B has rank ", f.b->shape[1]));
    }
    if (r != cfg.RankFor(key)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "config and tensors disagree: rank ",
                                                     r, " in the tensors, ", cfg.RankFor(key),
                                                     " from r/rank_pattern"));
    }
    if (f.a->shape[1] != in || f.b->shape[0] != out) {
      return absl::FailedPreconditionError(
          absl::StrCat(prefix, "does not fit the base model: lora_A is [", f.a->shape[0], ", ",
                       f.a->shape[1], "] and lora_B [", f.b->shape[0], ", ", f.b->shape[1],
                       "], the base layer is ", out, " x ", in));
    }
    if (cfg.use_dora && f.magnitude == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "lora_magnitude_vector is missing (use_dora is true)"));
    }
    if (f.magnitude != nullptr && f.magnitude->shape[0] != out) {
      return absl::FailedPreconditionError(
          absl::StrCat(prefix, "does not fit the base model: lora_magnitude_vector has ",
                       f.magnitude->shape[0], " entries, the base layer ", out, " rows"));
    }
    Module mod{layer, m, f.a, f.b, in, out, r, cfg.ScaleFor(key)};
    mod.a_view = *f.a;
    mod.b_view = *f.b;
    mod.magnitude = f.magnitude;
    modules.push_back(std::move(mod));
  }
  if (options.compress_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_rank ", options.compress_rank, " for the rank compression is negative"));
  }
  if (options.compress_rank > 0) {
    CompressionReport report;
    report.max_rank = options.compress_rank;
    double discarded_sq = 0, total_sq = 0;
    for (Module& mod : modules) {
      ModuleCompression mc{ModuleKey(mod.layer, mod.m), mod.rank, mod.rank, 0.0};
      report.trained_max_rank = std::max(report.trained_max_rank, mod.rank);
      std::vector<float> a(mod.rank * mod.in), b(mod.out * mod.rank);
      if (!ConvertScaled(*mod.a, 1.0f, kernels::DType::kF32,
                         reinterpret_cast<uint8_t*>(a.data())) ||
          !ConvertScaled(*mod.b, mod.scale, kernels::DType::kF32,
                         reinterpret_cast<uint8_t*>(b.data()))) {
        return absl::InvalidArgumentError(
            absl::StrCat(st_path, ": ", mc.module, ": has non-finite values"));
      }
      if (mod.rank > options.compress_rank) {
        TruncatedPair t =
            TruncateLowRank(a.data(), b.data(), mod.rank, mod.in, mod.out, options.compress_rank);
        mc.rank = t.rank;
        mc.relative_error = t.relative_error;
        discarded_sq += t.discarded_sq;
        total_sq += t.total_sq;
        mod.rank = t.rank;
        mod.scale = 1.0f;  // folded into the truncated B
        mod.a_f32 = std::move(t.a);
        mod.b_f32 = std::move(t.b);
        mod.a_view = F32View(mod.a_f32, mod.rank, mod.in);
        mod.b_view = F32View(mod.b_f32, mod.out, mod.rank);
      } else {  // kept as trained; its share of the update counts in the overall error
        total_sq += FrobeniusSquaredOfProduct(a.data(), b.data(), mod.rank, mod.in, mod.out);
      }
      report.modules.push_back(std::move(mc));
    }
    report.relative_error = total_sq > 0 ? std::sqrt(discarded_sq / total_sq) : 0.0;
    adapter->compression_ = std::move(report);
  }
  for (const Module& mod : modules) {
    if (mod.rank > options.max_rank) {
      return absl::FailedPreconditionError(absl::StrCat(
          st_path, ": ", ModuleKey(mod.layer, mod.m), ": rank ", mod.rank,
          " exceeds the maximum LoRA rank ", options.max_rank,
          options.compress_rank > 0 ? "" : " (max_rank compresses it at registration)"));
    }
  }

  // DoRA: g per module from the pristine base weights, one layer at a time, and the f32 A and s B
  // as served (compressed or not), before they are rounded to the storage dtype.
  if (cfg.use_dora && !options.dora_refused.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(dir, ": DoRA: ", options.dora_refused));
  }
  if (cfg.use_dora && !options.base_weights) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, ": DoRA needs the base model's weights for its norms"));
  }
  if (cfg.use_dora) {
    for (size_t first = 0; first < modules.size();) {
      size_t last = first;
      std::array<bool, kNumLinearModules> wanted{};
      while (last < modules.size() && modules[last].layer == modules[first].layer) {
        wanted[static_cast<int>(modules[last++].m)] = true;
      }
      std::array<std::vector<float>, kNumLinearModules> weights;
      LP_RETURN_IF_ERROR(options.base_weights(modules[first].layer, wanted, &weights));
      for (size_t i = first; i < last; ++i) {
        Module& mod = modules[i];
        const std::string key = ModuleKey(mod.layer, mod.m);
        const std::vector<float>& w = weights[static_cast<int>(mod.m)];
        if (static_cast<int64_t>(w.size()) != mod.out * mod.in) {
          return absl::InternalError(absl::StrCat(key, ": the base weight read for DoRA has ",
                                                  w.size(), " values, not ", mod.out * mod.in));
        }
        std::vector<float> a(mod.rank * mod.in), b(mod.out * mod.rank), mag(mod.out);
        if (!ConvertScaled(mod.a_view, 1.0f, kernels::DType::kF32,
                           reinterpret_cast<uint8_t*>(a.data())) ||
            !ConvertScaled(mod.b_view, mod.scale, kernels::DType::kF32,
                           reinterpret_cast<uint8_t*>(b.data())) ||
            !ConvertScaled(*mod.magnitude, 1.0f, kernels::DType::kF32,
                           reinterpret_cast<uint8_t*>(mag.data()))) {
          return absl::InvalidArgumentError(
              absl::StrCat(st_path, ": ", key, ": has non-finite values"));
        }
        if (!DoraScale(w, a, b, mag, mod.rank, mod.in, mod.out, &mod.dora_scale)) {
          return absl::InvalidArgumentError(absl::StrCat(
              st_path, ": ", key,
              ": DoRA's scale m / ||W + s B A|| is 0 or not finite for some row (a zero magnitude "
              "or a row of W + s B A that is all zeros)"));
        }
      }
      first = last;
    }
  }

  // One buffer for every converted matrix (see storage_), slices 64 bytes apart: the A and B
  // matrices in the order a decode step reads them (model::LoraStorageKey), then the DoRA scales.
  const int64_t elem = options.dtype == kernels::DType::kF32 ? 4 : 2;
  auto f32_bytes = [](int64_t elements) { return (elements * 4 + 63) / 64 * 64; };
  std::vector<model::LoraMatrixSlot> slots;  // module i's A at 2 i, its B at 2 i + 1
  for (const Module& mod : modules) {
    slots.push_back({model::LoraStorageKey(mod.layer, mod.m, false), mod.rank * mod.in * elem});
    slots.push_back({model::LoraStorageKey(mod.layer, mod.m, true), mod.out * mod.rank * elem});
  }
  int64_t storage_bytes = 0;
  const std::vector<int64_t> offset = model::PlaceLoraMatrices(slots, &storage_bytes);
  const int64_t matrix_bytes = storage_bytes;
  for (const Module& mod : modules) {
    if (!mod.dora_scale.empty()) storage_bytes += 2 * f32_bytes(mod.out);
  }
  // Default-initialised: every byte handed out below is written by ConvertScaled.
  adapter->storage_.reset(new uint8_t[storage_bytes]);
  uint8_t* const storage = adapter->storage_.get();
  uint8_t* next = storage + matrix_bytes;  // the next DoRA scales

  // Scale folding (once, in f32) and storage.
  adapter->view_.layers.assign(base.num_layers, {});
  adapter->view_.dora = cfg.use_dora;
  for (size_t i = 0; i < modules.size(); ++i) {
    const Module& mod = modules[i];
    const int64_t r = mod.rank;
    auto stored = std::make_unique<Stored>();
    uint8_t* a_data = storage + offset[2 * i];
    uint8_t* b_data = storage + offset[2 * i + 1];
    if (!ConvertScaled(mod.a_view, 1.0f, options.dtype, a_data) ||
        !ConvertScaled(mod.b_view, mod.scale, options.dtype, b_data)) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": ", ModuleKey(mod.layer, mod.m), ": has non-finite values"));
    }
    stored->pair.rank = r;
    stored->pair.a = {options.dtype, a_data, r, mod.in};
    stored->pair.b = {options.dtype, b_data, mod.out, r};
    adapter->bytes_ += (r * mod.in + mod.out * r) * elem;
    if (!mod.dora_scale.empty()) {
      float* g = reinterpret_cast<float*>(next);
      float* inv = reinterpret_cast<float*>(next + f32_bytes(mod.out));
      next += 2 * f32_bytes(mod.out);
      for (int64_t o = 0; o < mod.out; ++o) {
        g[o] = mod.dora_scale[o];
        inv[o] = 1.0f / mod.dora_scale[o];
      }
      stored->pair.dora_scale = g;
      stored->pair.dora_inv_scale = inv;
      adapter->bytes_ += 2 * mod.out * 4;
    }
    adapter->max_rank_ = std::max(adapter->max_rank_, r);
    adapter->view_.layers[mod.layer][static_cast<int>(mod.m)] = &stored->pair;
    adapter->pairs_.push_back(std::move(stored));
  }
  return adapter;
}

std::vector<std::string> LoraAdapter::target_modules() const {
  std::vector<std::string> names;
  for (int m = 0; m < kNumLinearModules; ++m) {
    for (const auto& layer : view_.layers) {
      if (layer[m] != nullptr) {
        names.push_back(kModuleNames[m]);
        break;
      }
    }
  }
  return names;
}

}  // namespace loraplex::adapters
