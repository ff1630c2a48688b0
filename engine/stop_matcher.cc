#include "engine/stop_matcher.h"

#include <algorithm>

namespace loraplex::engine {

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (std::string& s : stops) {
    if (s.empty()) continue;
    max_stop_len_ = std::max(max_stop_len_, s.size());
    stops_.push_back(std::move(s));
  }
}

StopMatcher::Result StopMatcher::Push(const std::string& delta) {
  Result result;
  if (stopped_) return result;
  if (stops_.empty()) {
    result.text = delta;
    return result;
  }
  held_ += delta;
  // The earliest match wins: text before it is sent, the rest dropped.
  size_t first = std::string::npos;
  for (const std::string& s : stops_) {
    size_t pos = held_.find(s);
    if (pos < first) first = pos;
  }
  if (first != std::string::npos) {
    stopped_ = true;
    result.stopped = true;
    result.text = held_.substr(0, first);
    held_.clear();
    return result;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string; send the rest. The
  // held suffix starts where a stop string would start, which is a character boundary because stop
  // strings are valid UTF-8.
  size_t keep = 0;
  for (const std::string& s : stops_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  result.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return result;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(held_);
  if (stopped_) out.clear();
  return out;
}

}  // namespace loraplex::engine
