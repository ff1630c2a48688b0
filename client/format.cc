#include "client/format.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/reflection.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace loraplex::client {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

nlohmann::json FieldValue(const Message& msg, const Reflection& r, const FieldDescriptor* f,
                          int index) {
  const bool rep = f->is_repeated();
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
      return rep ? r.GetRepeatedInt32(msg, f, index) : r.GetInt32(msg, f);
    case FieldDescriptor::CPPTYPE_INT64:
      return rep ? r.GetRepeatedInt64(msg, f, index) : r.GetInt64(msg, f);
    case FieldDescriptor::CPPTYPE_UINT32:
      return rep ? r.GetRepeatedUInt32(msg, f, index) : r.GetUInt32(msg, f);
    case FieldDescriptor::CPPTYPE_UINT64:
      return rep ? r.GetRepeatedUInt64(msg, f, index) : r.GetUInt64(msg, f);
    case FieldDescriptor::CPPTYPE_DOUBLE:
      return rep ? r.GetRepeatedDouble(msg, f, index) : r.GetDouble(msg, f);
    case FieldDescriptor::CPPTYPE_FLOAT:
      return rep ? r.GetRepeatedFloat(msg, f, index) : r.GetFloat(msg, f);
    case FieldDescriptor::CPPTYPE_BOOL:
      return rep ? r.GetRepeatedBool(msg, f, index) : r.GetBool(msg, f);
    case FieldDescriptor::CPPTYPE_ENUM:
      return rep ? r.GetRepeatedEnum(msg, f, index)->name() : r.GetEnum(msg, f)->name();
    case FieldDescriptor::CPPTYPE_STRING:
      return rep ? r.GetRepeatedString(msg, f, index) : r.GetString(msg, f);
    case FieldDescriptor::CPPTYPE_MESSAGE:
      return ProtoToJson(rep ? r.GetRepeatedMessage(msg, f, index) : r.GetMessage(msg, f));
  }
  return nullptr;
}

}  // namespace

nlohmann::json ProtoToJson(const Message& msg) {
  nlohmann::json out = nlohmann::json::object();
  const auto* d = msg.GetDescriptor();
  const Reflection* r = msg.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (f->is_map()) {
      nlohmann::json m = nlohmann::json::object();
      const auto* key_f = f->message_type()->map_key();
      const auto* val_f = f->message_type()->map_value();
      for (int j = 0; j < r->FieldSize(msg, f); ++j) {
        const Message& entry = r->GetRepeatedMessage(msg, f, j);
        const Reflection* er = entry.GetReflection();
        nlohmann::json key = FieldValue(entry, *er, key_f, 0);
        m[key.is_string() ? key.get<std::string>() : key.dump()] = FieldValue(entry, *er, val_f, 0);
      }
      out[f->name()] = m;
    } else if (f->is_repeated()) {
      nlohmann::json a = nlohmann::json::array();
      for (int j = 0; j < r->FieldSize(msg, f); ++j) a.push_back(FieldValue(msg, *r, f, j));
      out[f->name()] = a;
    } else if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !r->HasField(msg, f)) {
      out[f->name()] = nullptr;
    } else {
      out[f->name()] = FieldValue(msg, *r, f, 0);
    }
  }
  return out;
}

std::string FormatTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(width[c] - row[c].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

std::string HumanBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (std::fabs(v) >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", v, units[u]);
}

std::string Num(double v, int decimals) {
  std::string s = absl::StrFormat("%.*f", decimals, v);
  if (s.find('.') != std::string::npos) {
    while (!s.empty() && s.back() == '0') s.pop_back();
    if (!s.empty() && s.back() == '.') s.pop_back();
  }
  return s;
}

}  // namespace loraplex::client
