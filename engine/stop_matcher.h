// Stop strings over streamed text: decides which text may be sent now and which must be held back
// because it could be the start of a stop string, and cuts the text where a stop string begins.
// Not thread-safe (one per request, used by the engine thread).
#pragma once

#include <string>
#include <vector>

namespace loraplex::engine {

class StopMatcher {
 public:
  // Empty stop strings are ignored.
  explicit StopMatcher(std::vector<std::string> stops);

  struct Result {
    std::string text;      // safe to send now
    bool stopped = false;  // a stop string matched; `text` ends just before it
  };
  // Appends `delta` (whole UTF-8 characters) to the generated text. After a match, further calls
  // return nothing.
  Result Push(const std::string& delta);
  // The text held back, to send when generation ends for another reason.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  size_t max_stop_len_ = 0;
  std::string held_;  // text received but not sent: a possible start of a stop string
  bool stopped_ = false;
};

}  // namespace loraplex::engine
