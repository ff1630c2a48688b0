#include "common/flags.h"

namespace loraplex {

DashedArgs::DashedArgs(int argc, char** argv) {
  storage_.reserve(argc);
  bool after_double_dash = false;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") after_double_dash = true;
    if (!after_double_dash && i > 0 && a.size() > 2 && a[0] == '-') {
      size_t start = a[1] == '-' ? 2 : 1;
      size_t end = a.find('=');
      if (end == std::string::npos) end = a.size();
      for (size_t j = start; j < end; ++j) {
        if (a[j] == '-') a[j] = '_';
      }
    }
    storage_.push_back(std::move(a));
  }
  for (auto& s : storage_) ptrs_.push_back(s.data());
  ptrs_.push_back(nullptr);
  ptrs_.pop_back();
}

}  // namespace loraplex
