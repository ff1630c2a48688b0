#include "formats/tensor_info.h"

namespace loraplex::formats {

std::string_view StoredTypeName(StoredType t) {
  switch (t) {
    case StoredType::kF32:
      return "F32";
    case StoredType::kF16:
      return "F16";
    case StoredType::kBF16:
      return "BF16";
    case StoredType::kQ8_0:
      return "Q8_0";
    case StoredType::kQ4_0:
      return "Q4_0";
    case StoredType::kQ4_1:
      return "Q4_1";
    case StoredType::kQ4_K:
      return "Q4_K";
    case StoredType::kQ5_K:
      return "Q5_K";
    case StoredType::kQ6_K:
      return "Q6_K";
  }
  return "UNKNOWN";
}

}  // namespace loraplex::formats
